//! Test frames: Ethernet + IPv4/IPv6 + a TCP SYN with the options Linux
//! sends (MSS, SACK-permitted, timestamps, window scale), so 74 bytes over
//! IPv4 and 94 over IPv6, with valid checksums.
use std::net::{Ipv4Addr, Ipv6Addr};

const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const SPORT: u16 = 40_000;

fn sum(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        let word = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        acc += u32::from(word);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// TCP header (40 bytes) with the SYN flag and options; checksum zero.
fn tcp_syn(dport: u16) -> [u8; 40] {
    let mut t = [0u8; 40];
    t[0..2].copy_from_slice(&SPORT.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes()); // seq
    t[12] = 10 << 4; // data offset: 10 words
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64_240u16.to_be_bytes()); // window
    // MSS 1460, SACK permitted, timestamps, NOP, window scale 7.
    let opts = [2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7];
    t[20..40].copy_from_slice(&opts);
    t
}

fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(94);
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

pub fn syn_v4(src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut tcp = tcp_syn(dport);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&60u16.to_be_bytes()); // total length
    ip[6] = 0x40; // DF
    ip[8] = 64; // TTL
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = fold(sum(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&40u16.to_be_bytes());
    let c = fold(sum(&tcp, sum(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut f = ethernet(0x0800);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

pub fn syn_v6(src: Ipv6Addr, dst: Ipv6Addr, dport: u16) -> Vec<u8> {
    let mut tcp = tcp_syn(dport);
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&40u16.to_be_bytes()); // payload length
    ip[6] = 6; // next header: TCP
    ip[7] = 64; // hop limit
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&40u32.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 6]);
    let c = fold(sum(&tcp, sum(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut f = ethernet(0x86dd);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_checksums() {
        let f = syn_v4(Ipv4Addr::new(198, 51, 100, 7), Ipv4Addr::new(203, 0, 113, 1), 25);
        assert_eq!(f.len(), 74);
        assert_eq!(fold(sum(&f[14..34], 0)), 0, "IPv4 header checksum verifies");
        let f = syn_v6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 25);
        assert_eq!(f.len(), 94);
    }
}
