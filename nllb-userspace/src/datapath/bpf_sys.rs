//! The bpf(2) commands aya 0.14 does not offer publicly:
//! - opening a pinned link and keeping its pin (`PinnedLink::from_pin`
//!   exists, but its fd is private and `unpin` removes the pin);
//! - swapping a link's program in place, and detaching a link now;
//! - reading a map-in-map's raw value (the inner map's id) without opening
//!   the inner map by id, which needs CAP_SYS_ADMIN;
//! - creating a map with BTF type ids (aya's `Array::create` has none, so
//!   bpftool would show the service tables as hex), which needs the BTF ids
//!   of a map the loader created (`MapInfo` does not expose them).
//!
//! Every attr is a `#[repr(C)]` prefix of `union bpf_attr`; pointers travel
//! as u64 (`as usize as u64`), so the same code is right on 32-bit CPUs.

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
    let mut attr = ObjGetAttr { pathname: c.as_ptr() as usize as u64, bpf_fd: 0, file_flags: 0 };
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
        info: &mut info as *mut CgroupLinkInfo as usize as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info.cgroup_id)
}

/// A cgroup v2 directory's id is its inode number.
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(path)?.ino())
}

const BPF_LINK_DETACH: libc::c_long = 34;

#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// Detach a link now (Linux 5.9+). Dropping the last reference detaches too,
/// but from deferred work, so `nllb uninstall` could return before the
/// program is gone.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr { link_fd: link.as_raw_fd() as u32 };
    sys_bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;

/// The head of `struct bpf_map_info` (through the BTF type ids).
#[repr(C)]
#[derive(Default)]
struct MapInfoHead {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    name: [u8; 16],
    ifindex: u32,
    btf_vmlinux_value_type_id: u32,
    netns_dev: u64,
    netns_ino: u64,
    btf_id: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
    _pad: u32,
}

/// A map's shape and BTF identity, to create more maps like it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
    pub btf_id: u32,
    pub btf_key_type_id: u32,
    pub btf_value_type_id: u32,
}

pub fn map_shape(map: BorrowedFd<'_>) -> io::Result<MapShape> {
    let mut info = MapInfoHead::default();
    let mut attr = InfoAttr {
        bpf_fd: map.as_raw_fd() as u32,
        info_len: std::mem::size_of::<MapInfoHead>() as u32,
        info: &mut info as *mut MapInfoHead as usize as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(MapShape {
        map_type: info.map_type,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
        map_flags: info.map_flags,
        btf_id: info.btf_id,
        btf_key_type_id: info.btf_key_type_id,
        btf_value_type_id: info.btf_value_type_id,
    })
}

#[repr(C)]
struct BtfGetFdAttr {
    btf_id: u32,
}

#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
}

/// A new map shaped like `shape`, with its BTF type ids when the kernel
/// still has that BTF (else without: the map works the same, bpftool shows
/// hex).
pub fn create_map_like(shape: &MapShape, name: &str) -> io::Result<OwnedFd> {
    let mut map_name = [0u8; 16];
    for (d, s) in map_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let btf = if shape.btf_id != 0 {
        let mut a = BtfGetFdAttr { btf_id: shape.btf_id };
        // SAFETY: the kernel returned a new fd that we now own.
        sys_bpf(BPF_BTF_GET_FD_BY_ID, &mut a).ok().map(|fd| unsafe { OwnedFd::from_raw_fd(fd as i32) })
    } else {
        None
    };
    let mut attr = MapCreateAttr {
        map_type: shape.map_type,
        key_size: shape.key_size,
        value_size: shape.value_size,
        max_entries: shape.max_entries,
        map_flags: shape.map_flags,
        inner_map_fd: 0,
        numa_node: 0,
        map_name,
        map_ifindex: 0,
        btf_fd: btf.as_ref().map_or(0, |f| f.as_raw_fd() as u32),
        btf_key_type_id: if btf.is_some() { shape.btf_key_type_id } else { 0 },
        btf_value_type_id: if btf.is_some() { shape.btf_value_type_id } else { 0 },
    };
    let fd = sys_bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The id of the inner map stored at `key` of a map-in-map (what a lookup
/// from userspace returns).
pub fn inner_map_id<K>(outer: BorrowedFd<'_>, key: &K) -> io::Result<u32> {
    let mut id = 0u32;
    let mut attr = ElemAttr {
        map_fd: outer.as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as usize as u64,
        value: &mut id as *mut u32 as usize as u64,
        flags: 0,
    };
    sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
    Ok(id)
}
