//! Network namespaces: open them by path, run code inside them, and read their cookie.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole life.
//! [`NetNs::run`] switches the calling thread into a namespace, runs a closure (typically one
//! that creates sockets), and switches back before returning, so the caller can keep using its
//! thread (a tokio worker, say) as if nothing happened. The closure must not block on anything
//! that could move it across threads: it runs synchronously on the current thread.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// `SO_NETNS_COOKIE` (Linux 5.14+), not yet exported by every libc version.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Errors from namespace operations. Each names the namespace and what to check.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error(
        "cannot open network namespace {path}: {source} (does the pod still exist? the agent needs the host's /run/netns or /proc mounted)"
    )]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a network namespace: {source}")]
    NotNetNs { path: PathBuf, source: io::Error },
    #[error(
        "cannot enter network namespace {path}: {source} (setns needs CAP_SYS_ADMIN; is the agent privileged?)"
    )]
    Enter { path: PathBuf, source: io::Error },
    #[error(
        "cannot return to the agent's own network namespace: {0}; the thread is now unusable and the process must exit"
    )]
    Return(io::Error),
    #[error("cannot read the cookie of network namespace {path}: {source} (needs Linux 5.14+)")]
    Cookie { path: PathBuf, source: io::Error },
}

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    /// Opens the namespace at `path` (`/run/netns/NAME`, `/proc/PID/ns/net`, ...).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, NetNsError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| NetNsError::Open {
            path: path.clone(),
            source,
        })?;
        // Reject files that are not network namespaces before anybody calls setns on them.
        // SAFETY: ioctl on an fd we own; NS_GET_NSTYPE takes no argument.
        let ty = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if ty < 0 {
            return Err(NetNsError::NotNetNs {
                path,
                source: io::Error::last_os_error(),
            });
        }
        if ty != libc::CLONE_NEWNET {
            return Err(NetNsError::NotNetNs {
                path,
                source: io::Error::other(format!("namespace type {ty:#x}")),
            });
        }
        Ok(Self { file, path })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetNsError> {
        // Per-thread path: the process-wide /proc/self/ns/net is the main thread's.
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        Self::open(format!("/proc/self/task/{tid}/ns/net"))
    }

    /// The path this namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the calling thread inside this namespace, then switches back to the
    /// namespace the thread was in before.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T, NetNsError> {
        let home = Self::current()?;
        self.run_from(&home, f)
    }

    /// Like [`NetNs::run`], but returns to `home` instead of looking up the thread's current
    /// namespace first: one file open less on hot paths. `home` must be the namespace the
    /// calling thread is in.
    pub fn run_from<T>(&self, home: &NetNs, f: impl FnOnce() -> T) -> Result<T, NetNsError> {
        setns(self.file.as_fd()).map_err(|source| NetNsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        // Switch back even if `f` panics: a caught panic (tokio catches task panics) would
        // otherwise leave the thread in this namespace.
        let _back = ReturnOnDrop(home);
        Ok(f())
    }

    /// Moves the calling thread into this namespace for good (for dedicated threads and
    /// `pre_exec` hooks).
    pub fn enter(&self) -> Result<(), NetNsError> {
        setns(self.file.as_fd()).map_err(|source| NetNsError::Enter {
            path: self.path.clone(),
            source,
        })
    }

    /// The namespace's cookie: the value `bpf_get_netns_cookie()` returns for sockets in it.
    pub fn cookie(&self) -> Result<u64, NetNsError> {
        let err = |source| NetNsError::Cookie {
            path: self.path.clone(),
            source,
        };
        let sock = self
            .run(|| socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None))?
            .map_err(err)?;
        socket_netns_cookie(&sock).map_err(err)
    }

    /// The raw descriptor (for APIs such as sk_lookup attachment).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Switches the calling thread back to the namespace it holds when dropped (see [`NetNs::run`]).
struct ReturnOnDrop<'a>(&'a NetNs);

impl Drop for ReturnOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.file.as_fd()) {
            // A thread stuck in a pod's namespace would silently create sockets in the wrong
            // place; there is no safe way to continue.
            eprintln!("{}", NetNsError::Return(e));
            std::process::abort();
        }
    }
}

/// The network namespace cookie of the namespace a socket lives in.
pub fn socket_netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, output buffer of the advertised length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The socket cookie (`SO_COOKIE`) of a socket: what `bpf_get_socket_cookie()` returns.
pub fn socket_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, output buffer of the advertised length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

// _IO(0xb7, 0x3)
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fd is a valid namespace descriptor for the duration of the call.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_namespace_has_a_cookie_and_run_returns() {
        // setns needs CAP_SYS_ADMIN even into one's own namespace.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 && std::env::var("CI").as_deref() != Ok("true") {
            eprintln!("skipping: needs root");
            return;
        }
        let ns = NetNs::current().expect("own netns");
        let c = ns.cookie().expect("cookie");
        assert_ne!(c, 0);
        let v = ns.run(|| 42).expect("run");
        assert_eq!(v, 42);
        assert_eq!(
            NetNs::current().and_then(|n| n.cookie()).expect("cookie"),
            c
        );
    }

    #[test]
    fn missing_namespace_names_the_path() {
        let err = NetNs::open("/run/netns/definitely-not-here").expect_err("must fail");
        assert!(
            err.to_string().contains("/run/netns/definitely-not-here"),
            "{err}"
        );
    }

    #[test]
    fn a_regular_file_is_not_a_namespace() {
        let err = NetNs::open("/proc/self/status").expect_err("must fail");
        assert!(matches!(err, NetNsError::NotNetNs { .. }), "{err}");
    }
}
