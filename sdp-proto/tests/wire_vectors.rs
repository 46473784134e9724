//! Hex vectors for every message layout of SDP-WIRE.md §§1–4: parse gives the expected
//! value, emit gives the exact bytes, and malformed variants name the field.

use sdp_proto::wire::*;

fn hex(s: &str) -> Vec<u8> {
    let d: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
    d.chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

/// Parses `bytes`, checks the body, and checks that emitting gives the same bytes.
fn vector(bytes: &str, want: Body<'_>) {
    let b = hex(bytes);
    let m = MessageRepr::parse(&b).unwrap();
    assert_eq!(m.body, want);
    assert_eq!(m.bsdh.len as usize, b.len());
    assert_eq!(m.to_vec(), b, "emit is byte-exact");
}

#[test]
fn wire_disconn_vector() {
    vector("02 00 0004 00000010 00000009 00000003", Body::DisConn);
}

#[test]
fn wire_abortconn_vector() {
    vector("03 00 0004 00000010 0000000a 00000003", Body::AbortConn);
}

#[test]
fn wire_sendsm_vector() {
    vector("04 00 0002 00000010 00000001 00000007", Body::SendSm);
}

#[test]
fn wire_rdma_wr_compl_vector() {
    vector(
        "05 00 0001 00000014 00000002 00000001  00010000",
        Body::RdmaWrCompl(RdmaComplRepr { len: 65536 }),
    );
}

#[test]
fn wire_rdma_rd_compl_vector_with_req_pipe() {
    let b = hex("06 04 0008 00000014 00000005 00000004  001fe000");
    let m = MessageRepr::parse(&b).unwrap();
    assert!(m.bsdh.flags.contains(Flags::REQ_PIPE));
    assert_eq!(m.body, Body::RdmaRdCompl(RdmaComplRepr { len: 0x1f_e000 }));
    assert_eq!(m.to_vec(), b);
}

#[test]
fn wire_mode_change_vectors_all_six_codes() {
    for (byte, half, mode) in [
        (0x00, ModeHalf::Receive, TransferMode::Buffered),
        (0x10, ModeHalf::Receive, TransferMode::Combined),
        (0x20, ModeHalf::Receive, TransferMode::Pipelined),
        (0x80, ModeHalf::Send, TransferMode::Buffered),
        (0x90, ModeHalf::Send, TransferMode::Combined),
        (0xA0, ModeHalf::Send, TransferMode::Pipelined),
    ] {
        vector(
            &format!("07 00 0001 00000014 00000001 00000000 {byte:02x} 000000"),
            Body::ModeChange(ModeChangeRepr { half, mode }),
        );
    }
    let bad = hex("07 00 0001 00000014 00000001 00000000 30 000000");
    assert_eq!(
        MessageRepr::parse(&bad),
        Err(WireError::Invalid {
            field: "mch.mode",
            value: 3
        })
    );
}

#[test]
fn wire_cancel_and_ack_vectors() {
    vector(
        "08 00 0003 00000010 00000006 00000002",
        Body::SrcAvailCancel,
    );
    vector(
        "09 00 0003 00000010 00000006 00000002",
        Body::SinkAvailCancel,
    );
    vector("0a 00 0003 00000010 00000006 00000002", Body::SinkCancelAck);
    vector("0e 00 0003 00000010 00000006 00000002", Body::SuspCommAck);
}

#[test]
fn wire_ch_rcv_buf_and_ack_vectors() {
    vector(
        "0b 00 0002 00000014 00000011 00000010  00008000",
        Body::ChRcvBuf(ChRcvBufRepr { size: 32768 }),
    );
    vector(
        "0c 00 0002 00000014 00000011 00000010  00008000",
        Body::ChRcvBufAck(ChRcvBufRepr { size: 32768 }),
    );
}

#[test]
fn wire_susp_comm_vector() {
    vector(
        "0d 00 0001 00000018 00000001 00000000  00000000 00011f90",
        Body::SuspComm(SuspCommRepr {
            service_id: 0x1_1f90,
        }),
    );
}

#[test]
fn wire_sinkavail_vector_with_payload() {
    vector(
        "fd 00 0004 00000026 00000003 00000002  00010000 12345678 00000000 00001000 00000007  6869",
        Body::SinkAvail {
            header: SinkAvailRepr {
                len: 65536,
                rkey: 0x1234_5678,
                vaddr: 0x1000,
                non_discards: 7,
            },
            payload: b"hi",
        },
    );
}

#[test]
fn wire_srcavail_vector_with_inline_data() {
    // §4.3: Len counts the inline bytes too; MLNX VAddr is an FMR offset.
    vector(
        "fe 03 0009 00000023 00000008 00000004  00100000 0000abcd 00000000 00000200  616263",
        Body::SrcAvail {
            header: SrcAvailRepr {
                len: 1 << 20,
                rkey: 0xabcd,
                vaddr: 0x200,
            },
            payload: b"abc",
        },
    );
}

#[test]
fn wire_data_vectors_payload_and_credit_update() {
    vector(
        "ff 00 0010 00000015 00000001 00000000  68656c6c6f",
        Body::Data(b"hello"),
    );
    vector("ff 00 0012 00000010 00000002 00000001", Body::Data(b""));
}

#[test]
fn wire_unknown_mid_preserved() {
    vector(
        "40 00 0001 00000013 00000001 00000000  010203",
        Body::Unknown {
            mid: 0x40,
            rest: &[1, 2, 3],
        },
    );
}

#[test]
fn wire_hello_and_hello_ack_inside_message_round_trip() {
    let hello = HelloRepr {
        bufs: 9,
        version: Version::V2_2,
        cap: 0,
        max_adverts: 1,
        des_rem_rcv_sz: 32784,
        local_rcv_sz: 32784,
        local_port: 40000,
        addrs: IpAddrs::V4 {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
        },
        ext_max_adverts: 0,
    };
    let bytes = hello.to_bytes();
    // The layout of §2.2: IPv4 in the last four of sixteen bytes.
    assert_eq!(&bytes[..8], &hex("00 00 0009 0000005c")[..]);
    assert_eq!(&bytes[16..20], &[0x22, 0x40, 0x00, 0x01]);
    assert_eq!(&bytes[28..30], &[0x9c, 0x40]);
    assert_eq!(
        &bytes[32..48],
        &hex("00000000 00000000 00000000 0a000001")[..]
    );
    assert_eq!(
        &bytes[48..64],
        &hex("00000000 00000000 00000000 0a000002")[..]
    );
    let m = MessageRepr::parse(&bytes).unwrap();
    assert_eq!(m.body, Body::Hello(hello));
    assert_eq!(m.to_vec(), bytes.to_vec());
    let ack = HelloAckRepr {
        bufs: 16,
        version: Version::V2_2,
        ipv_cap: 0,
        max_adverts: 1,
        act_rcv_sz: 32784,
    };
    let ab = ack.to_bytes();
    assert_eq!(
        &ab[..24],
        &hex("01 00 0010 000000c4 00000000 00000000 22 00 00 01 00008010")[..]
    );
    assert!(ab[24..].iter().all(|&b| b == 0));
    assert_eq!(MessageRepr::parse(&ab).unwrap().body, Body::HelloAck(ack));
}

#[test]
fn wire_len_mismatch_and_truncation_name_the_field() {
    let b = hex("ff 00 0010 00000020 00000001 00000000  6869");
    assert_eq!(
        MessageRepr::parse(&b),
        Err(WireError::LengthMismatch {
            declared: 32,
            actual: 18
        })
    );
    let b = hex("fe 00 0010 0000001c 00000001 00000000  00000001 00000002 00000000");
    assert!(matches!(
        MessageRepr::parse(&b),
        Err(WireError::Truncated {
            field: "srcah.vaddr",
            ..
        })
    ));
    let b = hex("06 00 0010 00000012 00000001 00000000  0000");
    assert!(matches!(
        MessageRepr::parse(&b),
        Err(WireError::Truncated {
            field: "rrch.len",
            ..
        })
    ));
    let b = hex("02 00 0010 00000011 00000001 00000000  00");
    assert!(matches!(
        MessageRepr::parse(&b),
        Err(WireError::Invalid {
            field: "bsdh.len",
            ..
        })
    ));
    assert!(matches!(
        MessageRepr::parse(&[0xff; 10]),
        Err(WireError::Truncated {
            field: "bsdh.mseq_ack",
            ..
        })
    ));
}

#[test]
fn wire_views_read_fields_at_documented_offsets() {
    let b = hex("fe 00 0009 00000021 00000008 00000004  00100000 0000abcd 00000000 00000200  61");
    let v = SrcAvail::new_checked(&b[..]).unwrap();
    assert_eq!(
        (v.len(), v.rkey(), v.vaddr(), v.payload()),
        (1 << 20, 0xabcd, 0x200, &b"a"[..])
    );
    let bs = Bsdh::new_checked(&b[..]).unwrap();
    assert_eq!(
        (bs.mid(), bs.bufs(), bs.len(), bs.mseq(), bs.mseq_ack()),
        (MessageId::SrcAvail, 9, 33, 8, 4)
    );
}
