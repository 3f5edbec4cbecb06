//! Packet captures on the lab's fabric (the inter-node link) with tcpdump, for checks such as
//! "no plaintext crosses between nodes". The capture process is stopped in `Drop`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Lab;

/// A running capture of every frame on the fabric bridge.
pub struct PacketCapture {
    child: Option<Child>,
    path: PathBuf,
}

impl PacketCapture {
    /// Starts `tcpdump -i n1` in the lab's fabric namespace: node 1's port on the bridge (frames
    /// forwarded between ports are not seen on the bridge device itself), writing to `<dir>/fabric.pcap`,
    /// and waits until it is capturing.
    pub fn start(lab: &Lab, dir: &Path) -> Result<Self, String> {
        let path = dir.join("fabric.pcap");
        let _ = std::fs::remove_file(&path);
        let child = Command::new("ip")
            .args(["netns", "exec", lab.fabric_netns(), "tcpdump", "-Z", "root", "-i", "n1", "--immediate-mode", "-U", "-n", "-s", "0", "-w"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("tcpdump.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .map_err(|e| format!("starting tcpdump: {e} (install the Debian package tcpdump: `cargo xtask setup`)"))?;
        let mut cap = Self {
            child: Some(child),
            path,
        };
        let start = Instant::now();
        // The pcap header (24 bytes) is written once the interface is open.
        while std::fs::metadata(&cap.path).map_or(0, |m| m.len()) < 24 {
            if let Some(c) = cap.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                return Err(format!(
                    "tcpdump exited early ({status}); is it installed and may it capture?"
                ));
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err("tcpdump did not start capturing within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the kernel attach the socket before traffic flows.
        std::thread::sleep(Duration::from_millis(200));
        Ok(cap)
    }

    /// Stops the capture and returns the raw pcap bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        self.stop();
        std::fs::read(&self.path).unwrap_or_default()
    }

    /// What tcpdump printed (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path.with_file_name("tcpdump.log")).unwrap_or_default()
    }

    /// Number of captured packets matching a tcpdump filter (after [`Self::finish`]).
    pub fn count(&self, filter: &str) -> usize {
        Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&self.path)
            .arg(filter)
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGINT: tcpdump flushes and exits.
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PacketCapture {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
