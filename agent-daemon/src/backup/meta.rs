//! What a file carries beside its content, read at backup and set at
//! restore: extended attributes (POSIX ACLs are two of them), owner and
//! group names, special files (FIFOs, devices) and the holes of sparse
//! files. The decisions (is a file worth probing for holes, where a run of
//! a file's data goes, whose id an owner gets) are pure functions; the rest
//! are thin calls into the kernel through rustix.

use super::*;
use rustix::fs::{FileType, Mode, SeekFrom, XattrFlags};
use rustix::io::Errno;
use std::os::unix::fs::FileExt;

/// The kernel's largest list of attribute names, and largest value.
const XATTR_MAX: usize = 64 << 10;

/// Reads every extended attribute of `path` (not following a link) that
/// this process may read, sorted by name. A file system without them
/// gives none. `buf` is reused between calls.
pub(super) fn read_xattrs(path: &Path, buf: &mut Vec<u8>) -> std::io::Result<Vec<Xattr>> {
    buf.resize(XATTR_MAX, 0);
    let listed = match rustix::fs::llistxattr(path, &mut buf[..]) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => 0,
        Err(e) => return Err(e.into()),
    };
    if listed == 0 {
        return Ok(Vec::new());
    }
    let names: Vec<Vec<u8>> = buf[..listed].split(|b| *b == 0).filter(|n| !n.is_empty()).map(<[u8]>::to_vec).collect();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let name_text = String::from_utf8_lossy(&name).into_owned();
        match rustix::fs::lgetxattr(path, name_text.as_str(), &mut buf[..]) {
            Ok(n) => out.push((name, buf[..n].to_vec())),
            // Removed between the list and the read.
            Err(Errno::NODATA) => {}
            Err(e) => {
                return Err(std::io::Error::other(format!(
                    "extended attribute {name_text}: {}",
                    std::io::Error::from(e)
                )));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Where attributes are set: an open file, or a path (not followed).
pub(super) enum On<'a> {
    /// A file being restored, through its descriptor.
    File(&'a fs::File),
    /// Anything else by its path.
    Path(&'a Path),
}

/// Sets `xattrs` on `on`; returns one line per attribute that could not be
/// set (the target's file system may lack them, or this process the right).
pub(super) fn set_xattrs(on: On<'_>, shown: &Path, xattrs: &[Xattr]) -> Vec<String> {
    let mut failed = Vec::new();
    for (name, value) in xattrs {
        let text = String::from_utf8_lossy(name);
        if name.contains(&0) {
            failed.push(format!("{}: extended attribute {text:?} not set: a name with a NUL byte", shown.display()));
            continue;
        }
        let set = match on {
            On::File(file) => rustix::fs::fsetxattr(file, text.as_ref(), value, XattrFlags::empty()),
            On::Path(path) => rustix::fs::lsetxattr(path, text.as_ref(), value, XattrFlags::empty()),
        };
        if let Err(e) = set {
            failed.push(format!("{}: extended attribute {text} not set: {}", shown.display(), std::io::Error::from(e)));
        }
    }
    failed
}

/// True for a file that may have holes: it allocates fewer bytes than it
/// holds (`blocks` of 512 bytes). Only those are probed with `SEEK_DATA`.
pub(super) fn may_be_sparse(len: u64, blocks: u64) -> bool {
    blocks.saturating_mul(512) < len
}

/// The data regions of `file` (`len` bytes), (offset, length) in order,
/// as `SEEK_DATA`/`SEEK_HOLE` find them; `None` when all of it is data (a
/// file system without holes answers so too).
pub(super) fn data_regions(file: &fs::File, len: u64) -> std::io::Result<Option<Vec<(u64, u64)>>> {
    let mut regions = Vec::new();
    let mut at = 0u64;
    while at < len {
        let start = match rustix::fs::seek(file, SeekFrom::Data(at)) {
            Ok(start) => start,
            // No data after `at`: the rest is a hole.
            Err(Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(file, SeekFrom::Hole(start))?.min(len);
        if end > start {
            regions.push((start, end - start));
        }
        at = end.max(start + 1);
    }
    rustix::fs::seek(file, SeekFrom::Start(0))?;
    Ok(if regions == [(0, len)] { None } else { Some(regions) })
}

/// Reads a file's data regions one after another (the content a sparse
/// file's chunks hold).
pub(super) struct Regions<'a> {
    file: &'a fs::File,
    regions: std::slice::Iter<'a, (u64, u64)>,
    /// The region being read: file offset and bytes left.
    current: (u64, u64),
}

impl<'a> Regions<'a> {
    pub(super) fn new(file: &'a fs::File, regions: &'a [(u64, u64)]) -> Self {
        Regions { file, regions: regions.iter(), current: (0, 0) }
    }
}

impl Read for Regions<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.1 == 0 {
            match self.regions.next() {
                Some(&region) => self.current = region,
                None => return Ok(0),
            }
        }
        let want = out.len().min(usize::try_from(self.current.1).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut out[..want], self.current.0)?;
        if n == 0 {
            // The file shrank under us: the read ends short, and the
            // backup's size check reports the file as changed.
            self.current.1 = 0;
            return Ok(0);
        }
        self.current = (self.current.0 + n as u64, self.current.1 - n as u64);
        Ok(n)
    }
}

/// Checks a sparse file's regions from a manifest (which a compromised
/// device may have written): in order, not overlapping, within `size`.
pub(super) fn check_regions(regions: &[(u64, u64)], size: u64) -> Result<(), String> {
    let mut end = 0u64;
    for &(offset, len) in regions {
        let next = offset.checked_add(len).ok_or("a data region past any size")?;
        if offset < end || next > size || len == 0 {
            return Err(format!("data region {offset}+{len} out of order or past the size {size}"));
        }
        end = next;
    }
    Ok(())
}

/// Writes the content of a file's data regions (read one after another,
/// as `chunk`s) at their offsets, so the gaps stay holes.
pub(super) struct RegionWriter<'a> {
    file: &'a fs::File,
    regions: std::slice::Iter<'a, (u64, u64)>,
    current: (u64, u64),
}

impl<'a> RegionWriter<'a> {
    pub(super) fn new(file: &'a fs::File, regions: &'a [(u64, u64)]) -> Self {
        RegionWriter { file, regions: regions.iter(), current: (0, 0) }
    }

    /// Writes the next `bytes` of the content; more content than the
    /// regions hold is an error.
    pub(super) fn write(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            while self.current.1 == 0 {
                self.current = *self.regions.next().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "more content than data regions")
                })?;
            }
            let n = bytes.len().min(usize::try_from(self.current.1).unwrap_or(usize::MAX));
            self.file.write_all_at(&bytes[..n], self.current.0)?;
            self.current = (self.current.0 + n as u64, self.current.1 - n as u64);
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// True once every region was filled.
    pub(super) fn is_full(&mut self) -> bool {
        self.current.1 == 0 && self.regions.all(|r| r.1 == 0)
    }
}

/// Makes a FIFO or device node at `dest` with the permission bits of `mode`.
pub(super) fn make_special(dest: &Path, kind: &EntryKind, mode: u32) -> std::io::Result<()> {
    let (file_type, dev) = match kind {
        EntryKind::Fifo => (FileType::Fifo, 0),
        EntryKind::Device { block: true, rdev } => (FileType::BlockDevice, *rdev),
        EntryKind::Device { block: false, rdev } => (FileType::CharacterDevice, *rdev),
        _ => return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a special file")),
    };
    rustix::fs::mknodat(rustix::fs::CWD, dest, file_type, Mode::from_bits_truncate(mode & 0o777), dev)?;
    Ok(())
}

/// Sets a path's modification time without following a link.
pub(super) fn set_mtime_nofollow(dest: &Path, mtime_ns: i64) -> std::io::Result<()> {
    let at = rustix::fs::Timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT as _ },
        last_modification: at,
    };
    rustix::fs::utimensat(rustix::fs::CWD, dest, &times, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// Users' and groups' names by id and ids by name, looked up through the
/// system's databases (NSS) once each.
#[derive(Debug, Default)]
pub(super) struct Names {
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
    uids: HashMap<String, Option<u32>>,
    gids: HashMap<String, Option<u32>>,
}

impl Names {
    /// The name of user `uid`, if the system has one.
    pub(super) fn user(&mut self, uid: u32) -> Option<&str> {
        self.users.entry(uid).or_insert_with(|| lookup_user_name(uid)).as_deref()
    }

    /// The name of group `gid`.
    pub(super) fn group(&mut self, gid: u32) -> Option<&str> {
        self.groups.entry(gid).or_insert_with(|| lookup_group_name(gid)).as_deref()
    }

    /// The uid a restored file gets: see [`owner_id`].
    pub(super) fn uid_for(&mut self, uid: u32, name: Option<&str>) -> u32 {
        let here = name.and_then(|n| *self.uids.entry(n.to_owned()).or_insert_with(|| lookup_uid(n)));
        owner_id(uid, here)
    }

    /// The gid a restored file gets.
    pub(super) fn gid_for(&mut self, gid: u32, name: Option<&str>) -> u32 {
        let here = name.and_then(|n| *self.gids.entry(n.to_owned()).or_insert_with(|| lookup_gid(n)));
        owner_id(gid, here)
    }
}

/// The owner a restored file gets: the id its recorded name has on this
/// system when it has that name (as tar does: a replacement device may
/// number its users differently), else the recorded id.
pub(super) fn owner_id(recorded: u32, by_name_here: Option<u32>) -> u32 {
    by_name_here.unwrap_or(recorded)
}

/// The buffer size for the reentrant NSS calls, and its ceiling.
const NSS_BUF: usize = 1 << 10;
const NSS_BUF_MAX: usize = 1 << 20;

/// Calls a reentrant NSS lookup with a growing buffer; `Some` if found.
fn nss<T>(mut call: impl FnMut(&mut [libc::c_char]) -> (libc::c_int, bool, Option<T>)) -> Option<T> {
    let mut size = NSS_BUF;
    loop {
        let mut buf = vec![0 as libc::c_char; size];
        let (rc, found, value) = call(&mut buf);
        if rc == libc::ERANGE && size < NSS_BUF_MAX {
            size *= 4;
            continue;
        }
        return if rc == 0 && found { value } else { None };
    }
}

#[allow(unsafe_code)]
fn lookup_user_name(uid: u32) -> Option<String> {
    nss(|buf| {
        // SAFETY: getpwuid_r(3) writes into `pwd` and `buf`, which live for
        // the call; `result` is null or points at `pwd`.
        unsafe {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut result = std::ptr::null_mut();
            let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
            let name = (!result.is_null() && !pwd.pw_name.is_null())
                .then(|| std::ffi::CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned());
            (rc, !result.is_null(), name)
        }
    })
}

#[allow(unsafe_code)]
fn lookup_group_name(gid: u32) -> Option<String> {
    nss(|buf| {
        // SAFETY: as in `lookup_user_name`, with getgrgid_r(3).
        unsafe {
            let mut grp: libc::group = std::mem::zeroed();
            let mut result = std::ptr::null_mut();
            let rc = libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result);
            let name = (!result.is_null() && !grp.gr_name.is_null())
                .then(|| std::ffi::CStr::from_ptr(grp.gr_name).to_string_lossy().into_owned());
            (rc, !result.is_null(), name)
        }
    })
}

#[allow(unsafe_code)]
fn lookup_uid(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    nss(|buf| {
        // SAFETY: as in `lookup_user_name`, with getpwnam_r(3); `name` is a
        // valid C string for the call.
        unsafe {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut result = std::ptr::null_mut();
            let rc = libc::getpwnam_r(name.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
            (rc, !result.is_null(), Some(pwd.pw_uid))
        }
    })
}

#[allow(unsafe_code)]
fn lookup_gid(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    nss(|buf| {
        // SAFETY: as in `lookup_uid`, with getgrnam_r(3).
        unsafe {
            let mut grp: libc::group = std::mem::zeroed();
            let mut result = std::ptr::null_mut();
            let rc = libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut result);
            (rc, !result.is_null(), Some(grp.gr_gid))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_that_allocate_less_than_they_hold_are_probed_for_holes() {
        assert!(may_be_sparse(2 << 30, 8));
        assert!(!may_be_sparse(4096, 8));
        assert!(!may_be_sparse(0, 0));
        // A small file in a 4 KiB block allocates more than it holds.
        assert!(!may_be_sparse(100, 8));
    }

    #[test]
    fn regions_from_a_manifest_are_checked() {
        assert!(check_regions(&[], 10).is_ok());
        assert!(check_regions(&[(0, 4), (8, 2)], 10).is_ok());
        for bad in [vec![(8, 2), (0, 4)], vec![(0, 4), (2, 4)], vec![(8, 4)], vec![(0, 0)], vec![(u64::MAX, 2)]] {
            assert!(check_regions(&bad, 10).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn an_owner_is_restored_by_name_when_the_system_has_it() {
        assert_eq!(owner_id(1000, Some(1001)), 1001);
        assert_eq!(owner_id(1000, None), 1000);
        let mut names = Names::default();
        assert_eq!(names.user(0), Some("root"));
        assert_eq!(names.uid_for(4242, Some("root")), 0);
        assert_eq!(names.uid_for(4242, Some("no-such-user-here")), 4242);
        assert_eq!(names.gid_for(4242, None), 4242);
    }

    /// A sparse file's data regions are found, read one after another and
    /// written back at their offsets: the copy holds the same bytes and
    /// allocates about what the original did.
    #[test]
    fn a_sparse_file_round_trips_through_its_data_regions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let file = fs::File::options().read(true).write(true).create_new(true).open(&path).unwrap();
        file.write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        file.write_all_at(&[2u8; 8192], 64 << 20).unwrap();
        file.set_len(128 << 20).unwrap();
        let meta = file.metadata().unwrap();
        assert!(may_be_sparse(meta.len(), meta.blocks()));
        let regions = data_regions(&file, meta.len()).unwrap().expect("holes found");
        assert!(regions.iter().map(|r| r.1).sum::<u64>() < 1 << 20, "{regions:?}");
        let mut content = Vec::new();
        Regions::new(&file, &regions).read_to_end(&mut content).unwrap();
        let copy_path = dir.path().join("copy");
        let copy = fs::File::create_new(&copy_path).unwrap();
        let mut writer = RegionWriter::new(&copy, &regions);
        for piece in content.chunks(3000) {
            writer.write(piece).unwrap();
        }
        assert!(writer.is_full());
        assert!(writer.write(b"x").is_err(), "more content than regions accepted");
        copy.set_len(meta.len()).unwrap();
        assert_eq!(fs::read(&path).unwrap(), fs::read(&copy_path).unwrap());
        assert!(copy.metadata().unwrap().blocks() <= meta.blocks() * 2, "the copy is not sparse");
        // A dense file has no regions of its own.
        let dense = dir.path().join("dense");
        fs::write(&dense, vec![3u8; 100_000]).unwrap();
        assert_eq!(data_regions(&fs::File::open(&dense).unwrap(), 100_000).unwrap(), None);
    }

    #[test]
    fn extended_attributes_round_trip_where_the_file_system_has_them() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"x").unwrap();
        fs::write(&b, b"y").unwrap();
        let mut buf = Vec::new();
        assert!(read_xattrs(&a, &mut buf).unwrap().is_empty());
        if rustix::fs::lsetxattr(&a, "user.color", b"blue", XattrFlags::empty()).is_err() {
            return; // this file system has no user attributes
        }
        rustix::fs::lsetxattr(&a, "user.empty", b"", XattrFlags::empty()).unwrap();
        let read = read_xattrs(&a, &mut buf).unwrap();
        assert_eq!(read, vec![(b"user.color".to_vec(), b"blue".to_vec()), (b"user.empty".to_vec(), vec![])]);
        assert!(set_xattrs(On::Path(&b), &b, &read).is_empty());
        assert_eq!(read_xattrs(&b, &mut buf).unwrap(), read);
        let failed = set_xattrs(On::Path(&b), &b, &[(b"bogus.ns".to_vec(), b"1".to_vec())]);
        assert!(failed.len() == 1 && failed[0].contains("bogus.ns not set"), "{failed:?}");
    }
}
