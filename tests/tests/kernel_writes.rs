//! The kernel may write into the heap on the program's behalf — `read(2)` from a file, `recv(2)`
//! from a socket — straight into `Heap::bytes_mut()` or into a persistent vector's buffer. Under
//! the default tracker such writes must work (no `EFAULT`), be seen as dirty, and become durable
//! at the next commit like any other write. (The `mprotect` tracker cannot do this — the kernel
//! does not raise SIGSEGV for its own accesses — and says so in its docs; `regions` only within
//! an open region. Both are opt-in.) All sockets are on 127.0.0.1.

use fams::alloc::{ObjectHeap, ObjectOptions, PVec};
use fams::{Heap, HeapOptions};
use fams_tests::*;
use std::io::Read;
use std::net::UdpSocket;
use std::time::Duration;

const HEAP_BYTES: u64 = 4 << 20;

fams::persistent! {
    struct Inbox<'h> {
        received: PVec<'h, u8>,
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A pair of loopback sockets: (receiver, sender connected to it).
fn loopback_pair() -> (UdpSocket, UdpSocket) {
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    tx.connect(rx.local_addr().unwrap()).unwrap();
    (rx, tx)
}

#[test]
fn file_reads_and_socket_receives_into_the_heap_are_committed_under_the_default_tracker() {
    let dir = TempDir::new("kernel-writes");
    let heap_path = dir.join("k.heap");
    format(&heap_path, HEAP_BYTES, None);
    let tracker = Heap::open(&heap_path, &HeapOptions::default()).unwrap().stats().tracker;
    eprintln!("default tracker here: {tracker:?}");

    // A file read straight into the heap, across several pages (and a page boundary).
    let file_bytes = pattern(7, 3 * 4096 + 100);
    std::fs::write(dir.join("input"), &file_bytes).unwrap();
    let file_at = 4096 - 50;
    let datagram = pattern(99, 1200);
    let datagram_at = 64 * 4096 + 10;
    {
        let mut h = Heap::open(&heap_path, &HeapOptions::default()).unwrap();
        h.commit().unwrap(); // every page clean and protected from here on
        let mut f = std::fs::File::open(dir.join("input")).unwrap();
        f.read_exact(&mut h.bytes_mut()[file_at..file_at + file_bytes.len()])
            .expect("read(2) into the heap must work under the default tracker");
        let (rx, tx) = loopback_pair();
        tx.send(&datagram).unwrap();
        let (n, _) = rx
            .recv_from(&mut h.bytes_mut()[datagram_at..datagram_at + 4096])
            .expect("recv(2) into the heap must work under the default tracker");
        assert_eq!(n, datagram.len());
        h.commit().unwrap();
        h.abandon(); // a crash: only the log holds the commit
    }
    let h = Heap::open(&heap_path, &HeapOptions::default()).unwrap();
    assert_eq!(&h.bytes()[file_at..file_at + file_bytes.len()], &file_bytes[..], "the file read was not committed");
    assert_eq!(&h.bytes()[datagram_at..datagram_at + datagram.len()], &datagram[..], "the datagram was not committed");
    h.close().unwrap();
}

#[test]
fn a_datagram_received_into_a_persistent_vectors_buffer_is_committed() {
    let dir = TempDir::new("kernel-writes-pvec");
    let heap_path = dir.join("v.heap");
    format(&heap_path, HEAP_BYTES, None);
    let datagram = pattern(3, 9000);
    {
        let mut o =
            ObjectHeap::open(Heap::open(&heap_path, &HeapOptions::default()).unwrap(), &ObjectOptions::schema(1))
                .unwrap();
        let (root, _) = o.root_with_alloc(|a| Inbox { received: PVec::new_in(a) }).unwrap();
        root.received.resize(16 << 10, 0);
        o.commit().unwrap();
        let (rx, tx) = loopback_pair();
        tx.send(&datagram).unwrap();
        let root = o.root::<Inbox>(|_| unreachable!()).unwrap();
        let (n, _) = rx.recv_from(&mut root.received[..]).expect("recv(2) into a PVec's buffer");
        root.received.truncate(n);
        o.commit().unwrap();
        o.abandon();
    }
    let mut o =
        ObjectHeap::open(Heap::open(&heap_path, &HeapOptions::default()).unwrap(), &ObjectOptions::schema(1)).unwrap();
    let root = o.root::<Inbox>(|_| panic!("the root was committed")).unwrap();
    assert_eq!(&root.received[..], &datagram[..], "the datagram in the PVec was not committed");
    o.close().unwrap();
}
