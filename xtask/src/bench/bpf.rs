//! The two bpf(2) calls the bench makes itself: loading the no-op XDP
//! program (the floor: `r0 = XDP_PASS; exit`, two instructions, so no
//! compiler is needed) and `BPF_PROG_TEST_RUN` on any program fd, the same
//! call for every contender.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix of its size;
    // the kernel zero-extends it and checks the unused tail.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// Loads `r0 = XDP_PASS; exit` as an XDP program named `rg_bench_noop`.
pub fn load_noop() -> io::Result<OwnedFd> {
    // struct bpf_insn: code, dst:4|src:4, off (i16), imm (i32).
    let insns: [[u8; 8]; 2] = [
        [0xb7, 0x00, 0, 0, XDP_PASS as u8, 0, 0, 0], // BPF_ALU64 | BPF_MOV | BPF_K: r0 = 2
        [0x95, 0, 0, 0, 0, 0, 0, 0],                 // BPF_JMP | BPF_EXIT
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..13].copy_from_slice(b"rg_bench_noop");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: BPF_PROG_LOAD returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Runs `prog` on `frame` `repeat` times in the kernel; returns the
/// program's verdict and the kernel's mean time per run, in nanoseconds.
pub fn test_run(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> io::Result<(u32, u32)> {
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((attr.retval, attr.duration))
}
