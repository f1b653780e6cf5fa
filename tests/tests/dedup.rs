//! Dedup through a real mount: a copy adds under 1% stored bytes; inserting one byte in the
//! middle of a 256 MiB file adds at most 3 chunks.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};

use pvfs_tests::{assert_fsck_clean, stats, Daemon, Scratch};
use rand::{RngCore, SeedableRng};

const SIZE: usize = 256 << 20;

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[test]
fn copies_dedup_and_an_insert_adds_few_chunks() {
    let s = Scratch::new();
    let d = Daemon::start(&s.data(), &s.mnt());
    let mut data = vec![0u8; SIZE];
    rand::rngs::StdRng::seed_from_u64(42).fill_bytes(&mut data);
    let orig = s.mnt().join("orig.bin");
    let mut f = fs::File::create(&orig).unwrap();
    for piece in data.chunks(1 << 20) {
        f.write_all(piece).unwrap();
    }
    drop(f);
    let s0 = stats(&s.data());

    // A copy by read/write (no copy_file_range): every byte goes through the chunker again.
    let mut src = fs::File::open(&orig).unwrap();
    let mut dst = fs::File::create(s.mnt().join("copy.bin")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).unwrap();
    }
    drop((src, dst));
    let s1 = stats(&s.data());
    let added = u(&s1, "stored_bytes") - u(&s0, "stored_bytes");
    println!(
        "copy of {SIZE} bytes added {added} stored bytes ({:.4}%)",
        added as f64 * 100.0 / u(&s0, "stored_bytes") as f64
    );
    assert!(
        added * 100 < u(&s0, "stored_bytes"),
        "copy added {added} bytes"
    );

    // Insert one byte in the middle of the original (rewriting its second half in place).
    let mid = SIZE / 2 + 12_345;
    let mut f = fs::OpenOptions::new().write(true).open(&orig).unwrap();
    f.seek(SeekFrom::Start(mid as u64)).unwrap();
    f.write_all(&[0x5a]).unwrap();
    for piece in data[mid..].chunks(1 << 20) {
        f.write_all(piece).unwrap();
    }
    drop(f);
    let s2 = stats(&s.data());
    let new_chunks = u(&s2, "chunks") - u(&s1, "chunks");
    println!("inserting one byte added {new_chunks} chunks");
    assert!(
        new_chunks <= 3,
        "inserting one byte added {new_chunks} chunks"
    );
    let mut expect = data[..mid].to_vec();
    expect.push(0x5a);
    expect.extend_from_slice(&data[mid..]);
    assert!(fs::read(&orig).unwrap() == expect, "edited file reads back");
    assert!(
        fs::read(s.mnt().join("copy.bin")).unwrap() == data,
        "copy reads back"
    );
    assert!(d.stop(), "clean exit on SIGTERM");
    assert_fsck_clean(&s.data());
}
