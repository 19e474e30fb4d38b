//! The two bpf(2) commands aya 0.14 keeps crate-private: opening a pinned
//! object without unpinning it, and swapping a link's program in place.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr points at a live, correctly laid out prefix of bpf_attr;
    // the kernel zero-fills the rest for the size we pass.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as libc::c_uint) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Open a pinned object (a link) and keep its pin.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr { pathname: c.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically replace the program behind a bpf_link (Linux 5.7+): the hook
/// never runs without a program.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr =
        LinkUpdateAttr { link_fd: link.as_raw_fd() as u32, new_prog_fd: new_prog.as_raw_fd() as u32, flags: 0, old_prog_fd: 0 };
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` for cgroup links.
#[repr(C)]
#[derive(Default)]
struct CgroupLinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

/// The id of the cgroup a cgroup bpf_link is attached to (0 once the
/// cgroup is gone).
pub fn link_cgroup_id(link: BorrowedFd<'_>) -> io::Result<u64> {
    let mut info = CgroupLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<CgroupLinkInfo>() as u32,
        info: &mut info as *mut CgroupLinkInfo as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.cgroup_id)
}

/// A cgroup v2 directory's id is its inode number.
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(path)?.ino())
}
