//! The fixed frames whose every truncation point the tests run.
use std::net::{Ipv4Addr, Ipv6Addr};

use super::{
    CLIENT_MAC, Ext, Ipv4, Ipv6, SERVER_MAC, Targets, Tcp, Vlan, ethernet, ethertype, ipv4_options, proto, tcp_v4,
    tcp_v6, udp,
};

/// Fixed frames whose every truncation point the tests run: one of each
/// header shape the parser walks, to a guarded port from `src_*`.
pub fn base_frames(src_v4: Ipv4Addr, src_v6: Ipv6Addr, targets: &Targets, port: u16) -> Vec<(&'static str, Vec<u8>)> {
    let (dst4, dst6) = (targets.dst_v4, targets.dst_v6);
    let mut tcp = Tcp::syn(40_000, port, 0x5247_0001);
    tcp.payload = b"EHLO".to_vec();
    let v4 = Ipv4::new(src_v4, dst4, proto::TCP);
    let mut v4_opts = v4.clone();
    v4_opts.options = ipv4_options(10);
    let mut v4_first = v4.clone();
    v4_first.more_fragments = true;
    let v6 = Ipv6::new(src_v6, dst6, proto::TCP);
    let eight = vec![
        Ext::HopByHop { len: 0 },
        Ext::DestOpts { len: 1 },
        Ext::Routing { len: 2 },
        Ext::Ah { len: 4, spi: 7 },
        Ext::Fragment {
            offset: 0,
            more: true,
            id: 9,
        },
        Ext::DestOpts { len: 0 },
        Ext::Ah { len: 1, spi: 8 },
        Ext::DestOpts { len: 3 },
    ];
    let mut nine = eight.clone();
    nine.push(Ext::DestOpts { len: 0 });
    let udp_v4 = Ipv4::new(src_v4, dst4, proto::UDP);
    vec![
        ("base v4", tcp_v4(&[], &v4, &tcp)),
        ("base v4 qinq", tcp_v4(&[Vlan::ad(100), Vlan::q(200)], &v4, &tcp)),
        (
            "base v4 3 tags",
            tcp_v4(&[Vlan::ad(100), Vlan::q(200), Vlan::q(300)], &v4, &tcp),
        ),
        ("base v4 options", tcp_v4(&[Vlan::q(5)], &v4_opts, &tcp)),
        ("base v4 first fragment", tcp_v4(&[], &v4_first, &tcp)),
        ("base v4 udp", {
            let u = udp(5353, port, b"x", src_v4.into(), dst4.into());
            ethernet(SERVER_MAC, CLIENT_MAC, &[], ethertype::IPV4, &udp_v4.packet(&u))
        }),
        ("base v6", tcp_v6(&[Vlan::q(7)], &v6, &tcp)),
        ("base v6 ext 8", tcp_v6(&[], &v6.clone().with_ext(eight), &tcp)),
        ("base v6 ext 9", tcp_v6(&[], &v6.clone().with_ext(nine), &tcp)),
        (
            "base v6 later fragment",
            tcp_v6(
                &[],
                &v6.clone().with_ext(vec![Ext::Fragment {
                    offset: 3,
                    more: false,
                    id: 1,
                }]),
                &tcp,
            ),
        ),
    ]
}
