//! Real-process tests: the peer is `shm-peer`, a separate program (fork + exec).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use common::{NOBODY, connect_peer, recv_one, send_blocking, spawn, unique_name, wait_ready};
use ib_verbs::shm::{self, Beacon, Endpoint, Intent, ProbeError};
use ib_verbs::{Access, ConnError, Connection, LocalSge, MemKey, RemoteSge};

const T: Duration = Duration::from_secs(10);

#[test]
fn process_echo_round_trips_both_directions() {
    let (mut c, _peer) = connect_peer("echo", &[], None);
    for i in 0..500u32 {
        let msg: Vec<u8> = (0..(i % 4000) + 1).map(|j| (i ^ j) as u8).collect();
        send_blocking(&mut c, &msg, T).unwrap();
        assert_eq!(recv_one(&mut c, T).unwrap(), msg, "message {i}");
    }
}

#[test]
fn process_rdma_read_from_peer_then_revoked_key_fails() {
    let (mut c, _peer) = connect_peer("source", &[], None);
    assert!(c.attrs().can_read_peer);
    let m = recv_one(&mut c, T).unwrap();
    let addr = u64::from_le_bytes(m[0..8].try_into().unwrap());
    let len = u32::from_le_bytes(m[8..12].try_into().unwrap());
    let key = MemKey(u32::from_le_bytes(m[12..16].try_into().unwrap()));
    let mut dst = vec![0u8; len as usize];
    // SAFETY: `dst` outlives the registration and is only written by the read.
    let lkey = unsafe { c.register(dst.as_mut_ptr(), dst.len(), Access::LocalWrite) }.unwrap();
    let local = LocalSge {
        addr: dst.as_ptr() as u64,
        len,
        key: lkey,
    };
    c.post_read(1, local, RemoteSge { addr, len, key }).unwrap();
    let mut comps = [common::empty(); 1];
    assert_eq!(c.poll_cq(&mut comps).unwrap(), 1);
    assert_eq!(comps[0].status, Ok(()));
    let want: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(dst, want);
    send_blocking(&mut c, b"done", T).unwrap();
    assert_eq!(recv_one(&mut c, T).unwrap(), b"revoked");
    c.post_read(2, local, RemoteSge { addr, len, key }).unwrap();
    assert_eq!(c.poll_cq(&mut comps).unwrap(), 1);
    assert_eq!(comps[0].status, Err(ib_verbs::WcError::RemoteKeyInvalid));
}

#[test]
fn process_peer_reads_our_memory() {
    let (mut c, _peer) = connect_peer("read", &[], None);
    let mut src = vec![3u8; 10_000];
    // SAFETY: `src` outlives the registration.
    let key = unsafe { c.register(src.as_mut_ptr(), src.len(), Access::RemoteRead) }.unwrap();
    let mut m = (src.as_ptr() as u64).to_le_bytes().to_vec();
    m.extend_from_slice(&10_000u32.to_le_bytes());
    m.extend_from_slice(&key.0.to_le_bytes());
    send_blocking(&mut c, &m, T).unwrap();
    let report = String::from_utf8(recv_one(&mut c, T).unwrap()).unwrap();
    assert_eq!(
        report,
        "read-ok 30000 can_read_peer=true peer_can_read=true"
    );
}

#[test]
fn process_other_uid_cannot_read_us_bcopy_only() {
    // The peer runs as nobody: the kernel refuses it process_vm_readv on us (root).
    let (mut c, _peer) = connect_peer("read", &[], Some(NOBODY));
    assert_eq!(c.attrs().peer_uid, Some(NOBODY));
    assert!(
        !c.attrs().peer_can_read,
        "nobody must not be able to read root's memory"
    );
    let mut src = vec![3u8; 4096];
    // SAFETY: `src` outlives the registration.
    let key = unsafe { c.register(src.as_mut_ptr(), src.len(), Access::RemoteRead) }.unwrap();
    let mut m = (src.as_ptr() as u64).to_le_bytes().to_vec();
    m.extend_from_slice(&4096u32.to_le_bytes());
    m.extend_from_slice(&key.0.to_le_bytes());
    send_blocking(&mut c, &m, T).unwrap();
    let report = String::from_utf8(recv_one(&mut c, T).unwrap()).unwrap();
    assert!(
        report.starts_with("read-refused ZcopyUnavailable can_read_peer=false"),
        "{report}"
    );
    // Buffered copy still works.
    send_blocking(&mut c, b"bye", T).unwrap();
}

#[test]
fn process_scribbling_peer_fuzz_no_crash_no_hang() {
    let mut ended = 0;
    for seed in 1..=6u64 {
        let (mut c, peer) = connect_peer("scribble", &[&seed.to_string()], None);
        let mut outcome = None;
        let start = std::time::Instant::now();
        let mut i = 0u32;
        while start.elapsed() < Duration::from_secs(3) {
            i += 1;
            let r = if i.is_multiple_of(2) {
                c.post_send(1, &[&i.to_le_bytes()])
                    .map_err(|e| e.to_string())
            } else {
                let mut comps = [common::empty(); 8];
                c.poll_cq(&mut comps).map(|_| ()).map_err(|e| e.to_string())
            };
            if let Err(e) = r
                && c.error().is_some()
            {
                outcome = Some(e);
                break;
            }
            if i.is_multiple_of(64) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        if outcome.is_some() {
            ended += 1;
        }
        drop(c);
        drop(peer);
    }
    assert!(
        ended >= 5,
        "scribbling peers should be caught, {ended} of 6 were"
    );
}

#[test]
fn beacon_owned_by_other_uid_rejected() {
    // Root owns the kernel listener; a beacon for the same address published by nobody is a
    // squatter.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = l.local_addr().unwrap();
    let mut squatter = spawn("beacon", "-", &[&server.to_string()], Some(NOBODY));
    wait_ready(&mut squatter);
    let client: SocketAddr = "127.0.0.1:40001".parse().unwrap();
    let intent = Intent::new(client, server).unwrap();
    assert_eq!(
        shm::probe(&intent, T),
        Err(ProbeError::OwnerMismatch { beacon_uid: NOBODY })
    );
    drop(squatter);
    let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert_eq!(
        shm::probe(&Intent::new(client, other).unwrap(), T),
        Err(ProbeError::NoBeacon)
    );
}

#[test]
fn beacon_owner_authenticated_intent_registered_endpoint_nonce() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = l.local_addr().unwrap();
    let beacon = Beacon::publish(server).unwrap();
    let client: SocketAddr = "127.0.0.1:40002".parse().unwrap();
    let intent = Intent::new(client, server).unwrap();
    let endpoint = Endpoint::bind(&intent).unwrap();
    let probe = std::thread::spawn(move || shm::probe(&intent, T));
    let visitor = loop {
        if let Some(v) = beacon.accept().unwrap() {
            break v;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(visitor.cred().uid, 0);
    let registered = visitor.answer(true, T).unwrap();
    let owner = probe.join().unwrap().unwrap();
    assert_eq!(owner.cred.uid, 0);
    assert_eq!(registered, intent);

    // An impostor of another uid reaches the endpoint first, with a guessed nonce.
    let name = String::from_utf8(shm::beacon::endpoint_name(&client, &server)).unwrap();
    let mut impostor = spawn("impostor", &name, &[], Some(NOBODY));
    wait_ready(&mut impostor);
    let server_side =
        std::thread::spawn(move || shm::connect_endpoint(&registered, 0).map(|(s, _)| s));
    let (stream, cred) = endpoint.accept(&intent, T).unwrap();
    assert_eq!(cred.uid, 0);
    let server_stream = server_side.join().unwrap().unwrap();
    // The bootstrap runs on the authenticated stream.
    let mut a = shm::Active::new(common::opts()).unwrap();
    a.post_recv(1).unwrap();
    a.send_offer(&stream, b"sdp-hello").unwrap();
    let offer = shm::Passive::recv_offer(&server_stream, T).unwrap();
    let mut acc = offer.accept(common::opts()).unwrap();
    acc.post_recv(1).unwrap();
    acc.send_answer(&server_stream, b"sdp-hello-ack").unwrap();
    let (mut ca, ack) = a.finish(&stream).unwrap();
    let mut cp = acc.finish(&server_stream).unwrap();
    assert_eq!(ack, b"sdp-hello-ack");
    send_blocking(&mut ca, b"over shm", T).unwrap();
    assert_eq!(recv_one(&mut cp, T).unwrap(), b"over shm");
    drop(unique_name("x"));
}

#[test]
fn endpoint_wrong_nonce_times_out() {
    let client: SocketAddr = "127.0.0.1:40003".parse().unwrap();
    let server: SocketAddr = "127.0.0.1:40004".parse().unwrap();
    let intent = Intent::new(client, server).unwrap();
    let endpoint = Endpoint::bind(&intent).unwrap();
    let mut wrong = intent;
    wrong.nonce[0] ^= 1;
    let t = std::thread::spawn(move || shm::connect_endpoint(&wrong, 0).map(|_| ()));
    assert_eq!(
        endpoint
            .accept(&intent, Duration::from_millis(300))
            .unwrap_err(),
        ProbeError::Timeout
    );
    t.join().unwrap().unwrap();
    let _ = ConnError::PeerClosed;
}
