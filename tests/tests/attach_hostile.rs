//! Hostile attach messages, one per class, each refused with its status and
//! a closed connection while another VM keeps running on the same daemon.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use faultline_attach::{
    connect, decode_header, recv_message, send_message, AttachRequest, MemslotDesc, MsgKind, RegionDesc, RegionKind,
    Reply, Status, NO_FD, REGION_WRITABLE,
};
use faultline_system_tests::{machine, Daemon, TracedMachine};
use memfd::{FileSeal, Memfd, MemfdOptions};
use sim_machine::layout::Layout;
use sim_machine::workload::{generate, replay_flat, Pattern};

fn memfd(size: u64, seal: bool) -> Memfd {
    let m = MemfdOptions::default().allow_sealing(true).create("hostile").unwrap();
    m.as_file().set_len(size).unwrap();
    if seal {
        m.add_seals(&[FileSeal::SealShrink]).unwrap();
    }
    m
}

/// A well-formed request for VM 7: 4 MiB RAM, one ring region for 1 vCPU.
fn good_request() -> AttachRequest {
    AttachRequest {
        vm_id: 7,
        nr_vcpus: 1,
        ipa_bits: 40,
        flags: 0,
        regions: vec![
            RegionDesc {
                kind: RegionKind::Guest,
                flags: REGION_WRITABLE,
                pa_base: 0x4000_0000,
                size: 4 << 20,
                page_size: 4096,
                fd_index: 0,
                fd_offset: 0,
            },
            RegionDesc {
                kind: RegionKind::Rings,
                flags: 0,
                pa_base: 0x2100_0000,
                size: 64 << 10,
                page_size: 4096,
                fd_index: 1,
                fd_offset: 0,
            },
            RegionDesc {
                kind: RegionKind::TablePool,
                flags: 0,
                pa_base: 0x2000_0000,
                size: 1 << 20,
                page_size: 4096,
                fd_index: NO_FD,
                fd_offset: 0,
            },
        ],
        memslots: vec![MemslotDesc { gpa: 0x4000_0000, size: 4 << 20, region: 0, flags: 0, region_offset: 0 }],
    }
}

/// Sends raw bytes with fds; returns the reply and the open connection.
fn send(daemon: &Daemon, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> (Reply, OwnedFd) {
    let conn: OwnedFd = connect(&daemon.socket).unwrap();
    send_message(conn.as_fd(), bytes, fds).unwrap();
    let msg = recv_message(conn.as_fd()).unwrap().expect("a reply");
    let (kind, payload) = decode_header(&msg.bytes).unwrap();
    assert_eq!(kind, MsgKind::Reply);
    (Reply::decode(payload).unwrap(), conn)
}

/// Sends a request that must be refused; returns the reply, and whether the
/// daemon then closed the connection.
fn attempt(daemon: &Daemon, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> (Reply, bool) {
    let (reply, conn) = send(daemon, bytes, fds);
    assert_ne!(reply.status, Status::Ok);
    let closed = matches!(recv_message(conn.as_fd()), Ok(None));
    (reply, closed)
}

#[test]
fn each_hostile_attach_is_refused_while_another_vm_runs() {
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    // The bystander: a long-running VM 1.
    let layout = Layout { nr_vcpus: 1, ..Layout::default() };
    let ops = 1_500_000;
    let mut bystander = machine(&daemon)
        .args([
            "--vcpus",
            "1",
            "--pattern",
            "sequential",
            "--ops",
            &ops.to_string(),
            "--seed",
            "3",
            "--spin-polls",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !daemon.log().contains("VM attached") {
        assert!(std::time::Instant::now() < deadline, "bystander never attached: {}", daemon.log());
        std::thread::sleep(Duration::from_millis(10));
    }

    let (ram, rings) = ram_and_rings();
    let fds = [ram.as_file().as_fd(), rings.as_file().as_fd()];
    let good = good_request();

    // Malformed: bad magic.
    let mut bytes = good.encode();
    bytes[0] ^= 0xff;
    let (r, closed) = attempt(&daemon, &bytes, &fds);
    assert_eq!(r.status, Status::Malformed, "{r:?}");
    assert!(closed);

    // Truncated: the payload ends before the memslot table.
    let bytes = good.encode();
    let (r, closed) = attempt(&daemon, &bytes[..bytes.len() - 8], &fds);
    assert_eq!(r.status, Status::Truncated, "{r:?}");
    assert!(closed);

    // Truncated: an fd the request names did not arrive.
    let (r, _) = attempt(&daemon, &good.encode(), &fds[..1]);
    assert_eq!(r.status, Status::Truncated, "{r:?}");

    // Wrong version.
    let mut bytes = good.encode();
    bytes[4] = 9;
    let (r, closed) = attempt(&daemon, &bytes, &fds);
    assert_eq!(r.status, Status::WrongVersion, "{r:?}");
    assert!(r.message.contains('9'));
    assert!(closed);

    // Overlapping memslots.
    let mut req = good.clone();
    req.memslots.push(MemslotDesc { gpa: 0x4010_0000, size: 1 << 20, region: 0, flags: 0, region_offset: 0 });
    let (r, closed) = attempt(&daemon, &req.encode(), &fds);
    assert_eq!(r.status, Status::Overlapping, "{r:?}");
    assert!(closed);

    // Overlapping PA windows.
    let mut req = good.clone();
    req.regions[2].pa_base = 0x4020_0000;
    let (r, _) = attempt(&daemon, &req.encode(), &fds);
    assert_eq!(r.status, Status::Overlapping, "{r:?}");

    // Undersized: the memfd is smaller than the region claims.
    let mut req = good.clone();
    req.regions[0].size = 8 << 20;
    req.memslots[0].size = 8 << 20;
    let (r, closed) = attempt(&daemon, &req.encode(), &fds);
    assert_eq!(r.status, Status::Undersized, "{r:?}");
    assert!(closed);

    // Undersized: a memslot runs past its region.
    let mut req = good.clone();
    req.memslots[0].region_offset = 2 << 20;
    let (r, _) = attempt(&daemon, &req.encode(), &fds);
    assert_eq!(r.status, Status::Undersized, "{r:?}");

    // Undersized: the ring region's header wants more vCPUs than it holds.
    let mut req = good.clone();
    req.nr_vcpus = 3;
    let (r, _) = attempt(&daemon, &req.encode(), &fds);
    assert!(matches!(r.status, Status::Malformed | Status::Undersized), "{r:?}");

    // A memfd that is not sealed against shrinking.
    let unsealed = memfd(4 << 20, false);
    let (r, _) = attempt(&daemon, &good.encode(), &[unsealed.as_file().as_fd(), rings.as_file().as_fd()]);
    assert_eq!(r.status, Status::Malformed, "{r:?}");
    assert!(r.message.contains("sealed"), "{r:?}");

    // Contents regions: outside every guest region, with flags, over a
    // file shorter than described, over the ring region.
    let contents = memfd(1 << 20, false);
    let fds3 = [ram.as_file().as_fd(), rings.as_file().as_fd(), contents.as_file().as_fd()];
    let with_contents = |pa_base, size, flags| {
        let mut req = good.clone();
        req.regions.push(RegionDesc { flags, ..RegionDesc::contents(pa_base, size, 2) });
        req.encode()
    };
    let (r, _) = attempt(&daemon, &with_contents(0x5000_0000, 1 << 20, 0), &fds3);
    assert_eq!((r.status, r.message.contains("outside every guest region")), (Status::Malformed, true), "{r:?}");
    let (r, _) = attempt(&daemon, &with_contents(0x4000_0000, 1 << 20, REGION_WRITABLE), &fds3);
    assert_eq!((r.status, r.message.contains("no flags")), (Status::Malformed, true), "{r:?}");
    let (r, _) = attempt(&daemon, &with_contents(0x4000_0000, 2 << 20, 0), &fds3);
    assert_eq!((r.status, r.message.contains("contents file has")), (Status::Undersized, true), "{r:?}");
    let (r, _) = attempt(&daemon, &with_contents(0x2100_0000, 64 << 10, 0), &fds3);
    assert_eq!(r.status, Status::Overlapping, "{r:?}");
    // Dirty-log regions: smaller than the logs they hold, two of them, one
    // claiming a PA window.
    let logs = memfd(4096, true);
    let fds_logs = [ram.as_file().as_fd(), rings.as_file().as_fd(), logs.as_file().as_fd(), logs.as_file().as_fd()];
    let with_logs = |pages: u64, regions: u32, pa_base: u64| {
        let mut req = good.clone();
        req.memslots[0].flags = faultline_attach::MEMSLOT_DIRTY_LOG;
        req.memslots[0].size = pages * 4096;
        for fd in 2..2 + regions {
            req.regions.push(RegionDesc { pa_base, ..RegionDesc::dirty_log(4096, fd) });
        }
        req.encode()
    };
    // 4096 bytes hold the two bitmaps of up to 16384 pages.
    let (r, _) = attempt(&daemon, &with_logs(16384 + 64, 1, 0), &fds_logs[..3]);
    assert_eq!((r.status, r.message.contains("dirty logs need")), (Status::Undersized, true), "{r:?}");
    let (r, _) = attempt(&daemon, &with_logs(1024, 2, 0), &fds_logs);
    assert_eq!((r.status, r.message.contains("one at most")), (Status::Malformed, true), "{r:?}");
    let (r, _) = attempt(&daemon, &with_logs(1024, 1, 0x4000_0000), &fds_logs[..3]);
    assert_eq!((r.status, r.message.contains("no flags, PA")), (Status::Malformed, true), "{r:?}");
    // The bystander's id is taken.
    let mut req = good.clone();
    req.vm_id = 1;
    let (r, _) = attempt(&daemon, &req.encode(), &fds);
    assert_eq!(r.status, Status::AlreadyAttached, "{r:?}");

    // A good request is accepted after all that (and detached by hanging
    // up), with well-placed contents (unsealed is fine: they are only read).
    let (r, conn) = send(&daemon, &with_contents(0x4010_0000, 1 << 20, 0), &fds3);
    assert_eq!(r.status, Status::Ok, "{r:?}");
    drop(conn);

    // The bystander was still running through all of it, and finishes intact.
    assert!(bystander.try_wait().unwrap().is_none(), "bystander finished before the hostile attempts ended");
    let out = bystander.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flat = replay_flat(&layout, &generate(Pattern::Sequential, &layout, ops, 3));
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest());
    assert_eq!(summary["faults"].as_u64().unwrap(), flat.expected_faults(true));
    assert_eq!(summary["detach"]["pins_remaining"].as_u64().unwrap(), 0);
}

/// The fds of `good_request()`'s VM: 4 MiB of RAM, and 64 KiB of rings
/// laid out empty (1 vCPU + control).
fn ram_and_rings() -> (Memfd, Memfd) {
    let (ram, rings) = (memfd(4 << 20, true), memfd(64 << 10, true));
    let map = faultline_attach::shm::MappedRegion::map(rings.as_file().as_fd(), 0, 64 << 10, 4096).unwrap();
    // SAFETY: the mapping lives until the end of this function and nobody else uses it yet.
    unsafe { hyp_core_region(map.base(), 64 << 10) };
    (ram, rings)
}

/// Lays out an empty ring region (1 vCPU + control, 16 entries).
///
/// # Safety
///
/// `base .. base + len` must be a live, writable mapping no one else uses.
unsafe fn hyp_core_region(base: std::ptr::NonNull<u8>, len: u64) {
    // SAFETY: forwarded from the caller.
    unsafe { hyp_core::ring::SharedRegion::create(base, len, 2, 16) }.unwrap();
}

#[test]
fn a_reattach_with_another_description_is_refused_with_the_reason() {
    let mut daemon = Daemon::start(&["--spin-polls", "0"]);
    let (ram, rings) = ram_and_rings();
    let fds = [ram.as_file().as_fd(), rings.as_file().as_fd()];
    let (r, attached) = send(&daemon, &good_request().encode(), &fds);
    assert_eq!(r.status, Status::Ok, "{r:?}");
    // The daemon dies with the VM attached; its successor finds the VM's
    // description in the state directory.
    daemon.kill_and_restart(nix::sys::signal::Signal::SIGKILL);
    let mut other = AttachRequest { flags: faultline_attach::ATTACH_REATTACH, ..good_request() };
    other.memslots[0].size = 2 << 20;
    let (r, closed) = attempt(&daemon, &other.encode(), &fds);
    assert_eq!(r.status, Status::Mismatch, "{r:?}");
    assert!(r.message.contains("vm 7 attached with another description (its memslots differ)"), "{r:?}");
    assert!(closed);
    drop(attached);
}

#[test]
fn a_reattach_whose_core_never_answers_fails_as_internal_not_as_a_mismatch() {
    // The VM comes back with its description, but nothing serves its
    // control ring (no core): the rebuild's questions go unanswered. The
    // daemon accepts the re-attach, then, once the core's deadline passes,
    // says the core did not answer; it does not claim a mismatch.
    let mut daemon = Daemon::start(&["--spin-polls", "0"]);
    let (ram, rings) = ram_and_rings();
    let fds = [ram.as_file().as_fd(), rings.as_file().as_fd()];
    let (r, attached) = send(&daemon, &good_request().encode(), &fds);
    assert_eq!(r.status, Status::Ok, "{r:?}");
    daemon.kill_and_restart(nix::sys::signal::Signal::SIGKILL);
    let again = AttachRequest { flags: faultline_attach::ATTACH_REATTACH, ..good_request() };
    let (r, conn) = send(&daemon, &again.encode(), &fds);
    assert_eq!(r.status, Status::Ok, "accepted, then rebuilt: {r:?}");
    let msg = recv_message(conn.as_fd()).unwrap().expect("the rebuild's outcome");
    let (kind, payload) = decode_header(&msg.bytes).unwrap();
    assert_eq!(kind, MsgKind::Reply);
    let r = Reply::decode(payload).unwrap();
    assert_eq!(r.status, Status::Internal, "{r:?}");
    assert!(r.message.contains("re-attach failed") && r.message.contains("did not answer"), "{r:?}");
    assert!(matches!(recv_message(conn.as_fd()), Ok(None)), "and the connection closed");
    assert!(daemon.log().contains("the core did not answer the rebuild's questions"), "{}", daemon.log());
    drop(attached);
}

#[test]
fn a_reattach_the_state_directory_has_no_record_of_is_refused() {
    // A successor with another state directory cannot find what the VM's
    // previous daemon evicted: it refuses rather than serve zeros.
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    let (ram, rings) = ram_and_rings();
    let fds = [ram.as_file().as_fd(), rings.as_file().as_fd()];
    let req = AttachRequest { flags: faultline_attach::ATTACH_REATTACH, ..good_request() };
    let (r, closed) = attempt(&daemon, &req.encode(), &fds);
    assert_eq!(r.status, Status::Mismatch, "{r:?}");
    assert!(r.message.contains("no record of vm 7") && r.message.contains("state_dir"), "{r:?}");
    assert!(closed);
}

#[test]
fn a_machine_that_rewrites_its_ring_header_after_attach_is_served_from_the_checked_copy() {
    // The daemon reads the ring region's header once, at attach, and serves
    // the rings from that copy. A machine that flips the header between a
    // good one and a bad one (a geometry that does not fit) while it
    // attaches and after the reply neither panics nor confuses the daemon:
    // each attach either is refused or serves and detaches cleanly, and a
    // bystander VM finishes intact.
    let daemon = Daemon::start(&["--spin-polls", "0"]);
    let layout = Layout { nr_vcpus: 1, ..Layout::default() };
    let ops = 20_000;
    let bystander = machine(&daemon)
        .args(["--vcpus", "1", "--pattern", "random", "--ops", &ops.to_string(), "--seed", "5", "--spin-polls", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ram = memfd(4 << 20, true);
    let rings = memfd(64 << 10, true);
    let map = faultline_attach::shm::MappedRegion::map(rings.as_file().as_fd(), 0, 64 << 10, 4096).unwrap();
    // SAFETY: the mapping lives until the end of the test; the daemon's
    // mapping of the same memory is only ever accessed atomically.
    unsafe { hyp_core_region(map.base(), 64 << 10) };
    let header = |at: u64| map.word(at * 8).unwrap();
    let good: Vec<u64> = (0..8).map(|i| header(i).load(std::sync::atomic::Ordering::Acquire)).collect();
    // 200 ring pairs do not fit in 64 KiB.
    let bad = hyp_core::ring::RegionHeader::new(200, 16).to_words();
    let flipping = std::sync::atomic::AtomicBool::new(true);
    let fds = [ram.as_file().as_fd(), rings.as_file().as_fd()];
    let (mut served, mut refused) = (0, 0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while flipping.load(std::sync::atomic::Ordering::Acquire) {
                for words in [&good[..], &bad[..]] {
                    for (i, w) in words.iter().enumerate() {
                        header(i as u64).store(*w, std::sync::atomic::Ordering::Release);
                    }
                    // Half the time good, half bad, leaving the CPU to others.
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        });
        // The flips stop however this ends (a failed assertion included).
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Release);
            }
        }
        let _stop = Stop(&flipping);
        for _ in 0..30 {
            let (r, conn) = send(&daemon, &good_request().encode(), &fds);
            match r.status {
                Status::Ok => {
                    served += 1;
                    // A daemon whose VM thread died would never answer.
                    faultline_attach::set_recv_timeout(conn.as_fd(), Duration::from_secs(10)).unwrap();
                    // Detached cleanly: the VM was served from the copy.
                    send_message(conn.as_fd(), &faultline_attach::encode_detach(), &[]).unwrap();
                    let msg = recv_message(conn.as_fd()).ok().flatten().expect("a detach reply");
                    let reply = Reply::decode(decode_header(&msg.bytes).unwrap().1).unwrap();
                    assert_eq!(reply.status, Status::Ok, "{reply:?}");
                }
                _ => {
                    assert!(r.message.contains("ring region"), "{r:?}");
                    refused += 1;
                }
            }
        }
    });
    assert!(served > 0 && refused > 0, "served {served}, refused {refused}: the flips never landed either way");
    let log = daemon.log();
    assert!(!log.contains("panicked"), "{log}");
    let out = bystander.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let flat = replay_flat(&layout, &generate(Pattern::Random, &layout, ops, 5));
    assert_eq!(summary["ram_digest"].as_u64().unwrap(), flat.ram_digest());
}

#[test]
fn an_attach_over_an_admission_limit_is_refused_with_the_limit_named() {
    // A daemon that takes one VM and 300 MiB of guest memory at most, and
    // sets its own oom_score_adj from its configuration (raised here: a
    // test may lack CAP_SYS_RESOURCE, which lowering it below 0 needs).
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("memory-manager.toml");
    std::fs::write(&config, "[limits]\nmax_vms = 1\nmax_guest_memory_mib = 300\n").unwrap();
    let daemon = Daemon::start(&["--config", config.to_str().unwrap(), "--spin-polls", "0", "--oom-score-adj", "300"]);
    let adj = std::fs::read_to_string(format!("/proc/{}/oom_score_adj", daemon.pid())).unwrap();
    assert_eq!(adj.trim(), "300", "the daemon set its oom_score_adj");
    // The first VM (256 MiB: 224 of RAM, 32 of ROM) attaches and pauses.
    let trace = dir.path().join("paused.trace");
    std::fs::write(&trace, "0 W 0x40000000 8\nPAUSE\n0 W 0x40001000 8\n").unwrap();
    let mut first = TracedMachine::spawn(&daemon, &["--vm-id", "41", "--vcpus", "1", "--spin-polls", "0"], &trace);
    first.wait_paused(0);
    let refused = |args: &[&str]| {
        let out = machine(&daemon).args(args).args(["--ops", "10", "--spin-polls", "0"]).output().unwrap();
        assert!(!out.status.success(), "attached over a limit");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let second = refused(&["--vm-id", "42", "--ram-mib", "8"]);
    assert!(second.contains("OverLimit") && second.contains("max_vms = 1"), "{second}");
    first.resume();
    drop(first.stdin);
    let out = first.child.wait_with_output().unwrap();
    assert!(out.status.success(), "the first VM finished");
    // Alone now, but 512 MiB of RAM and 32 of ROM pass 300 MiB.
    let big = refused(&["--vm-id", "43", "--ram-mib", "512"]);
    assert!(big.contains("max_guest_memory_mib = 300") && big.contains("544 MiB"), "{big}");
    // The first VM's claim went with it: one of the same size attaches.
    let out = machine(&daemon).args(["--vm-id", "44", "--ops", "100", "--spin-polls", "0"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_attach_from_a_user_not_allowed_is_refused_with_its_credentials() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    // The attach socket is open to everyone (mode 0666), but only root's
    // processes may attach.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("memory-manager.toml");
    std::fs::write(&config, "[attach_access]\nsocket_mode = 0o666\nallowed_uids = [0]\n").unwrap();
    let daemon = Daemon::start(&["--config", config.to_str().unwrap(), "--spin-polls", "0"]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&daemon.socket), 0o666);
    assert_eq!(mode(&daemon.socket.with_file_name("takeover.sock")), 0o600, "the takeover socket is the daemon's own");
    // Another user can reach the socket: its directory is open too.
    let parent = daemon.socket.parent().unwrap();
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = machine(&daemon).args(["--vm-id", "45", "--ops", "10"]).uid(65534).gid(65534).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody attached: {stderr}");
    assert!(stderr.contains("Forbidden") && stderr.contains("uid 65534 gid 65534"), "{stderr}");
    assert!(daemon.log().contains("may not attach"), "{}", daemon.log());
    // Root's machine attaches.
    let out = machine(&daemon).args(["--vm-id", "46", "--ops", "100", "--spin-polls", "0"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn under_host_memory_pressure_fresh_backing_past_the_reserve_is_refused_until_the_pressure_ends() {
    use faultline_system_tests::{metric_samples, scrape_metrics};
    // The daemon reads PSI from a file the test writes (the kernel's
    // format), every 20 ms; pressure from some avg10 = 30%, 1 MiB reserve.
    let dir = tempfile::tempdir().unwrap();
    let psi = dir.path().join("memory.pressure");
    let calm = "some avg10=0.50 avg60=0.10 avg300=0.00 total=1000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=10\n";
    let pressed =
        "some avg10=80.00 avg60=20.00 avg300=5.00 total=90000\nfull avg10=40.00 avg60=9.00 avg300=1.00 total=500\n";
    std::fs::write(&psi, calm).unwrap();
    let config = dir.path().join("memory-manager.toml");
    std::fs::write(
        &config,
        format!("[host_memory]\npsi_file = {psi:?}\nsome_avg10_percent = 30\nreserve_mib = 1\npoll_ms = 20\n"),
    )
    .unwrap();
    let daemon = Daemon::start(&["--config", config.to_str().unwrap(), "--spin-polls", "0", "--policy", "4k"]);
    let metrics = daemon.metrics_addr();
    let sample = |name: &str| metric_samples(&scrape_metrics(&metrics)).get(name).copied().unwrap_or(-1.0);
    let wait_for = |name: &str, want: f64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while sample(name) != want {
            assert!(std::time::Instant::now() < deadline, "{name} never became {want}: {}", daemon.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Writes to fresh 4 KiB pages: 16 while calm, 512 under pressure (the
    // reserve is 256 pages), 100 once it is over.
    const RAM: u64 = 0x4000_0000;
    let writes =
        |pages: std::ops::Range<u64>| -> String { pages.map(|p| format!("0 W {:#x} 8\n", RAM + p * 4096)).collect() };
    let text = [writes(0..16), writes(100..612), writes(1000..1100)].join("PAUSE\n");
    let trace = dir.path().join("grow.trace");
    std::fs::write(&trace, text).unwrap();
    let args = ["--vm-id", "45", "--vcpus", "1", "--spin-polls", "0", "--ram-page-kib", "4"];
    let mut m = TracedMachine::spawn(&daemon, &args, &trace);
    m.wait_paused(0);
    assert_eq!(sample("faultline_host_memory_pressure"), 0.0);

    std::fs::write(&psi, pressed).unwrap();
    wait_for("faultline_host_memory_pressure", 1.0);
    assert_eq!(sample("faultline_host_memory_reserve_left_bytes"), (1 << 20) as f64);
    m.resume();
    m.wait_paused(1);
    assert_eq!(sample("faultline_host_memory_refused_faults_total"), 256.0);
    assert_eq!(sample("faultline_faults_total{outcome=\"refused-host-pressure\"}"), 256.0);
    assert_eq!(sample("faultline_host_memory_reserve_left_bytes"), 0.0);
    assert_eq!(sample("faultline_host_memory_psi_some_avg10"), 80.0);
    assert!(daemon.log().contains("host memory pressure: fresh backing is limited to the reserve"), "{}", daemon.log());

    std::fs::write(&psi, calm).unwrap();
    wait_for("faultline_host_memory_pressure", 0.0);
    m.resume();
    drop(m.stdin);
    let out = m.child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["injected"].as_u64(), Some(256), "only the writes past the reserve were refused");
    assert_eq!(summary["faults"].as_u64(), Some(16 + 512 + 100));
    assert_eq!(sample("faultline_host_memory_pressure_episodes_total"), 1.0);
    assert!(daemon.log().contains("host memory pressure over"), "{}", daemon.log());
}
