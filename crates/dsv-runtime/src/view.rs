//! The read-only view a `--command` task gets of its dataset.
//!
//! A task's dataset is a cached copy (`.dsv/cache/versions/NAME`) made of
//! hard links to content files shared with every other cached version.
//! Permission bits do not bind root, so the child runs in its own mount
//! namespace in which the whole cache folder is a read-only bind mount:
//!
//! * **as root** (with `CAP_SYS_ADMIN`): `unshare(CLONE_NEWNS)`, every mount
//!   made private (nothing propagates back), the cache folder bind-mounted
//!   onto itself and remounted read-only; then `CAP_SYS_ADMIN` (remount,
//!   unmount, `setns`), `CAP_SYS_PTRACE` (reaching the writable tree through
//!   `/proc/PID/root` of a process outside) and `CAP_DAC_READ_SEARCH`
//!   (`open_by_handle_at` through another mount) are dropped from the
//!   bounding set, so the command, although root, cannot undo the view;
//!   a user namespace it might create copies the mounts locked.
//! * **as another user** (or root without `CAP_SYS_ADMIN`): the same inside
//!   a new user namespace mapping only the caller's own uid and gid; the
//!   command keeps its identity and, after `exec`, has no capability left.
//!
//! Where the kernel refuses both (some container runtimes forbid
//! namespaces) the command runs without the view: the cached copy is then
//! only protected by its permission bits, and `dsv` checks it after the task
//! and on every `get` (stat fingerprints), rebuilding what was changed.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Everything the child needs, prepared before `fork` (the child may not
/// allocate).
struct Prepared {
    dir: CString,
    root: CString,
    setgroups: CString,
    uid_map_path: CString,
    gid_map_path: CString,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
}

/// Makes `cmd` run with `dir` (the cache folder) read-only in a private
/// mount namespace. Spawning fails with the kernel's error when the view
/// cannot be set up; the caller may then spawn without it.
pub fn read_only(cmd: &mut Command, dir: &Path) {
    // SAFETY (of the calls below): getuid/getgid cannot fail.
    #[allow(unsafe_code)]
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let cs = |s: &str| CString::new(s).expect("no NUL in a constant");
    let p = Prepared {
        dir: CString::new(dir.as_os_str().as_bytes()).unwrap_or_else(|_| cs("/nonexistent")),
        root: cs("/"),
        setgroups: cs("/proc/self/setgroups"),
        uid_map_path: cs("/proc/self/uid_map"),
        gid_map_path: cs("/proc/self/gid_map"),
        uid_map: format!("{uid} {uid} 1\n").into_bytes(),
        gid_map: format!("{gid} {gid} 1\n").into_bytes(),
    };
    // SAFETY: the closure runs in the forked child before exec and only
    // makes system calls (unshare, mount, statvfs, prctl, open, write,
    // close) on data prepared above; it neither allocates nor takes locks.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || enter(&p));
    }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[allow(unsafe_code)]
fn enter(p: &Prepared) -> io::Result<()> {
    // SAFETY: plain system calls on NUL-terminated strings owned by `p`.
    unsafe {
        let root = libc::geteuid() == 0;
        if root && libc::unshare(libc::CLONE_NEWNS) == 0 {
            bind_read_only(p)?;
            return drop_capabilities();
        }
        check(libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS))?;
        write_file(&p.setgroups, b"deny")?;
        write_file(&p.uid_map_path, &p.uid_map)?;
        write_file(&p.gid_map_path, &p.gid_map)?;
        bind_read_only(p)?;
        if root {
            // uid 0 keeps its capabilities across exec, even in a user
            // namespace: drop those that could undo the view.
            drop_capabilities()?;
        }
        Ok(())
    }
}

#[allow(unsafe_code)]
unsafe fn bind_read_only(p: &Prepared) -> io::Result<()> {
    let null = std::ptr::null();
    check(libc::mount(
        null,
        p.root.as_ptr(),
        null,
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ))?;
    check(libc::mount(
        p.dir.as_ptr(),
        p.dir.as_ptr(),
        null,
        libc::MS_BIND | libc::MS_REC,
        std::ptr::null(),
    ))?;
    // A bind remount must keep the flags the mount already has (they may
    // be locked by an outer namespace).
    let mut st: libc::statvfs = std::mem::zeroed();
    check(libc::statvfs(p.dir.as_ptr(), &mut st))?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    check(libc::mount(
        null,
        p.dir.as_ptr(),
        null,
        flags,
        std::ptr::null(),
    ))
}

#[allow(unsafe_code)]
unsafe fn drop_capabilities() -> io::Result<()> {
    const CAP_DAC_READ_SEARCH: libc::c_ulong = 2;
    const CAP_SYS_PTRACE: libc::c_ulong = 19;
    const CAP_SYS_ADMIN: libc::c_ulong = 21;
    for cap in [CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH] {
        check(libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0))?;
    }
    // Ambient capabilities would survive exec for a non-root caller.
    check(libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
        0,
        0,
    ))
}

#[allow(unsafe_code)]
unsafe fn write_file(path: &CString, body: &[u8]) -> io::Result<()> {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = libc::write(fd, body.as_ptr().cast(), body.len());
    let err = io::Error::last_os_error();
    libc::close(fd);
    if n != body.len() as isize {
        return Err(err);
    }
    Ok(())
}
