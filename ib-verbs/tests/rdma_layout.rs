//! The committed bindings (src/rdma/bindings.rs) against the rdma-core headers installed here:
//! a C program prints `sizeof`/`offsetof`/constant values as the C compiler sees them, and
//! every one must equal the Rust value. Skipped, with the reason printed, where the headers or
//! a C compiler are missing (they are not needed to build or run libsdp).

use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use ib_verbs::rdma::bindings as b;

macro_rules! size {
    ($t:ident) => {
        (
            format!("sizeof(struct {})", stringify!($t)),
            size_of::<b::$t>() as u64,
        )
    };
}
macro_rules! off {
    ($t:ident, $($f:tt)+) => {
        (
            format!("offsetof(struct {}, {})", stringify!($t), stringify!($($f)+)),
            offset_of!(b::$t, $($f)+) as u64,
        )
    };
}
macro_rules! konst {
    ($m:ident :: $c:ident) => {
        (stringify!($c).to_string(), b::$m::$c as u64)
    };
}

fn checks() -> Vec<(String, u64)> {
    vec![
        size!(ibv_context),
        off!(ibv_context, ops),
        off!(ibv_context, cmd_fd),
        off!(ibv_context, num_comp_vectors),
        off!(ibv_context, abi_compat),
        size!(ibv_context_ops),
        off!(ibv_context_ops, poll_cq),
        off!(ibv_context_ops, req_notify_cq),
        off!(ibv_context_ops, post_send),
        off!(ibv_context_ops, post_recv),
        size!(ibv_qp),
        off!(ibv_qp, context),
        off!(ibv_qp, qp_num),
        off!(ibv_qp, state),
        off!(ibv_qp, events_completed),
        size!(ibv_cq),
        off!(ibv_cq, context),
        off!(ibv_cq, channel),
        off!(ibv_cq, cqe),
        off!(ibv_cq, comp_events_completed),
        size!(ibv_comp_channel),
        off!(ibv_comp_channel, fd),
        size!(ibv_pd),
        size!(ibv_mr),
        off!(ibv_mr, lkey),
        off!(ibv_mr, rkey),
        size!(ibv_sge),
        off!(ibv_sge, lkey),
        size!(ibv_send_wr),
        off!(ibv_send_wr, sg_list),
        off!(ibv_send_wr, num_sge),
        off!(ibv_send_wr, opcode),
        off!(ibv_send_wr, send_flags),
        off!(ibv_send_wr, wr.rdma.remote_addr),
        off!(ibv_send_wr, wr.rdma.rkey),
        size!(ibv_recv_wr),
        off!(ibv_recv_wr, num_sge),
        size!(ibv_wc),
        off!(ibv_wc, status),
        off!(ibv_wc, opcode),
        off!(ibv_wc, vendor_err),
        off!(ibv_wc, byte_len),
        off!(ibv_wc, qp_num),
        off!(ibv_wc, wc_flags),
        off!(ibv_wc, dlid_path_bits),
        size!(ibv_qp_cap),
        size!(ibv_qp_init_attr),
        off!(ibv_qp_init_attr, cap),
        off!(ibv_qp_init_attr, qp_type),
        off!(ibv_qp_init_attr, sq_sig_all),
        size!(ibv_qp_attr),
        off!(ibv_qp_attr, path_mtu),
        off!(ibv_qp_attr, rq_psn),
        off!(ibv_qp_attr, dest_qp_num),
        off!(ibv_qp_attr, qp_access_flags),
        off!(ibv_qp_attr, ah_attr),
        off!(ibv_qp_attr, pkey_index),
        off!(ibv_qp_attr, max_rd_atomic),
        off!(ibv_qp_attr, max_dest_rd_atomic),
        off!(ibv_qp_attr, min_rnr_timer),
        off!(ibv_qp_attr, port_num),
        off!(ibv_qp_attr, timeout),
        off!(ibv_qp_attr, retry_cnt),
        off!(ibv_qp_attr, rnr_retry),
        off!(ibv_qp_attr, rate_limit),
        size!(ibv_ah_attr),
        off!(ibv_ah_attr, dlid),
        off!(ibv_ah_attr, is_global),
        off!(ibv_ah_attr, port_num),
        size!(ibv_global_route),
        off!(ibv_global_route, sgid_index),
        off!(ibv_global_route, hop_limit),
        size!(ibv_port_attr),
        off!(ibv_port_attr, active_mtu),
        off!(ibv_port_attr, gid_tbl_len),
        off!(ibv_port_attr, lid),
        off!(ibv_port_attr, link_layer),
        size!(ibv_device_attr),
        off!(ibv_device_attr, max_qp_wr),
        off!(ibv_device_attr, max_cqe),
        off!(ibv_device_attr, max_qp_rd_atom),
        off!(ibv_device_attr, max_qp_init_rd_atom),
        off!(ibv_device_attr, phys_port_cnt),
        (
            String::from("sizeof(union ibv_gid)"),
            size_of::<b::ibv_gid>() as u64,
        ),
        size!(rdma_cm_id),
        size!(rdma_cm_event),
        size!(rdma_conn_param),
        off!(rdma_conn_param, private_data_len),
        konst!(ibv_qp_type::IBV_QPT_RC),
        konst!(ibv_qp_state::IBV_QPS_INIT),
        konst!(ibv_qp_state::IBV_QPS_RTR),
        konst!(ibv_qp_state::IBV_QPS_RTS),
        konst!(ibv_port_state::IBV_PORT_ACTIVE),
        konst!(ibv_wr_opcode::IBV_WR_SEND),
        konst!(ibv_wr_opcode::IBV_WR_RDMA_READ),
        konst!(ibv_send_flags::IBV_SEND_SIGNALED),
        konst!(ibv_send_flags::IBV_SEND_INLINE),
        konst!(ibv_access_flags::IBV_ACCESS_LOCAL_WRITE),
        konst!(ibv_access_flags::IBV_ACCESS_REMOTE_READ),
        konst!(ibv_wc_status::IBV_WC_SUCCESS),
        konst!(ibv_wc_status::IBV_WC_WR_FLUSH_ERR),
        konst!(ibv_wc_status::IBV_WC_REM_ACCESS_ERR),
        konst!(ibv_wc_status::IBV_WC_RETRY_EXC_ERR),
        konst!(ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR),
        konst!(ibv_qp_attr_mask::IBV_QP_STATE),
        konst!(ibv_qp_attr_mask::IBV_QP_AV),
        konst!(ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC),
        konst!(ibv_qp_attr_mask::IBV_QP_DEST_QPN),
        konst!(rdma_port_space::RDMA_PS_TCP),
    ]
}

#[test]
fn layout_bindings_match_installed_headers() {
    for h in [
        "/usr/include/infiniband/verbs.h",
        "/usr/include/rdma/rdma_cma.h",
    ] {
        if !Path::new(h).exists() {
            println!(
                "SKIP layout_bindings_match_installed_headers: {h} missing (apt-get install libibverbs-dev librdmacm-dev)"
            );
            return;
        }
    }
    let checks = checks();
    let dir = std::env::temp_dir().join(format!("rdma-layout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <infiniband/verbs.h>\n#include <rdma/rdma_cma.h>\nint main(void) {\n",
    );
    for (expr, _) in &checks {
        c += &format!("  printf(\"%llu\\n\", (unsigned long long)({expr}));\n");
    }
    c += "  return 0;\n}\n";
    let src = dir.join("layout.c");
    let exe = dir.join("layout");
    std::fs::write(&src, c).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = match Command::new(&cc).arg("-o").arg(&exe).arg(&src).output() {
        Ok(o) => o,
        Err(e) => {
            println!("SKIP layout_bindings_match_installed_headers: no C compiler ({cc}: {e})");
            return;
        }
    };
    assert!(
        out.status.success(),
        "compiling the layout probe failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let text = String::from_utf8(run.stdout).unwrap();
    let got: Vec<u64> = text.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(got.len(), checks.len());
    let bad: Vec<String> = checks
        .iter()
        .zip(&got)
        .filter(|((_, rust), c)| rust != *c)
        .map(|((e, rust), c)| format!("{e}: C {c}, Rust {rust}"))
        .collect();
    assert!(
        bad.is_empty(),
        "bindings differ from the installed headers (run scripts/gen-rdma-bindings.sh):\n{}",
        bad.join("\n")
    );
    println!(
        "{} sizes, offsets and constants match the installed headers",
        checks.len()
    );
}
