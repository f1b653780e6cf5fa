//! Real mDNS between three hosts: network namespaces on one bridge, created and removed by
//! the test. No static peers: the devices find each other and sync. One host's link is cut,
//! both sides make conflicting edits, the link comes back: all three converge and every
//! version survives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pvfs_tests::{assert_fsck_clean, bin, wait_until, Daemon, Lan, Scratch};

/// Every file below `root`: relative path -> content.
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if let Ok(data) = std::fs::read(&p) {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), data);
            }
        }
    }
    out
}

fn run_in(ns: &str, args: &[&str]) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(bin("pvfs"))
        .args(args)
        .output()
        .expect("run pvfs in a namespace")
}

#[test]
fn three_hosts_find_each_other_and_converge_after_a_partition() {
    let lan = match Lan::new(3) {
        Ok(l) => l,
        Err(e) if std::env::var_os("CI").is_none() => {
            println!("skipped: {e}");
            return;
        }
        Err(e) => panic!("cannot build the test LAN: {e}"),
    };
    let s: Vec<Scratch> = (0..3).map(|_| Scratch::new()).collect();
    let listen = ["--listen", "0.0.0.0:7420"];
    let d1 = Daemon::try_start_in(Some(&lan.host(1)), &s[0].data(), &s[0].mnt(), &listen).unwrap();
    let mut daemons = vec![d1];
    for i in 2..=3 {
        let out = daemons[0].admin(&["invite"]);
        assert!(
            out.status.success(),
            "invite: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let data = s[i - 1].data();
        let out = run_in(
            &lan.host(i),
            &[
                "join",
                &token,
                "--data",
                data.to_str().unwrap(),
                "--name",
                &format!("host{i}"),
            ],
        );
        assert!(
            out.status.success(),
            "join: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // No static peers: forget the inviter's address, mDNS must find it.
        std::fs::write(data.join("config.toml"), format!("name = \"host{i}\"\n")).unwrap();
        let d = Daemon::try_start_in(Some(&lan.host(i)), &data, &s[i - 1].mnt(), &listen).unwrap();
        daemons.push(d);
    }
    let mnt = |i: usize| s[i - 1].mnt();

    // Found by mDNS alone: a file from host 1 reaches 2 and 3.
    std::fs::write(mnt(1).join("hello.txt"), b"from host 1\n").unwrap();
    for i in 2..=3 {
        assert!(
            wait_until(Duration::from_secs(60), || std::fs::read(
                mnt(i).join("hello.txt")
            )
            .is_ok_and(|d| d == b"from host 1\n")),
            "host {i} never got hello.txt\n{}",
            daemons[i - 1].log_text()
        );
    }
    std::fs::write(mnt(2).join("shared.txt"), b"base\n").unwrap();
    for i in [1, 3] {
        assert!(wait_until(Duration::from_secs(30), || std::fs::read(
            mnt(i).join("shared.txt")
        )
        .is_ok_and(|d| d == b"base\n")));
    }

    // Partition host 3; conflicting edits on both sides of the cut.
    lan.set_link(3, false);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(mnt(1).join("shared.txt"), b"edited on host 1\n").unwrap();
    std::fs::write(mnt(3).join("shared.txt"), b"edited on host 3\n").unwrap();
    std::fs::write(mnt(1).join("same.txt"), b"created on host 1\n").unwrap();
    std::fs::write(mnt(3).join("same.txt"), b"created on host 3\n").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        std::fs::read(mnt(2).join("shared.txt")).unwrap(),
        b"edited on host 1\n",
        "host 2 follows host 1 during the cut"
    );
    lan.set_link(3, true);

    // All three converge; every version survives.
    let converged = wait_until(Duration::from_secs(90), || {
        let t1 = tree(&mnt(1));
        t1 == tree(&mnt(2)) && t1 == tree(&mnt(3)) && t1.len() >= 5
    });
    let t1 = tree(&mnt(1));
    let listing: Vec<String> = t1
        .iter()
        .map(|(p, d)| format!("{} = {:?}", p.display(), String::from_utf8_lossy(d)))
        .collect();
    let show = |i: usize| -> Vec<String> {
        tree(&mnt(i))
            .iter()
            .map(|(p, d)| format!("{} = {:?}", p.display(), String::from_utf8_lossy(d)))
            .collect()
    };
    assert!(
        converged,
        "no convergence:\nhost 1: {listing:#?}\nhost 2: {:#?}\nhost 3: {:#?}\nlog 2: {}\nlog 3: {}",
        show(2),
        show(3),
        daemons[1].log_text(),
        daemons[2].log_text()
    );
    let contents: Vec<&[u8]> = t1.values().map(Vec::as_slice).collect();
    for want in [
        &b"edited on host 1\n"[..],
        b"edited on host 3\n",
        b"created on host 1\n",
        b"created on host 3\n",
        b"from host 1\n",
    ] {
        assert!(
            contents.contains(&want),
            "lost {:?}: {listing:#?}",
            String::from_utf8_lossy(want)
        );
    }
    assert!(
        t1.keys()
            .any(|p| p.to_string_lossy().contains("(conflict ")),
        "conflict copies are named as such: {listing:#?}"
    );
    println!("converged: {listing:#?}");
    for d in daemons {
        assert!(d.stop(), "daemon did not stop cleanly");
    }
    for sc in &s {
        assert_fsck_clean(&sc.data());
    }
}
