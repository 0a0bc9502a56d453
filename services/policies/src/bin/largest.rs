//! `policy-largest`: the largest mapping correctness allows everywhere
//! (1 GiB where the memslot and backing allow it, else 2 MiB, else 4 KiB),
//! writable on read: fewest faults, coarsest tracking.

use clap::Parser;
use faultline_policies::{description, everywhere, serve, Common, PolicyServer};
use faultline_proto::v1 as pb;

#[derive(Parser)]
#[command(about = "Faultline memory policy: the largest mappings")]
struct Args {
    #[command(flatten)]
    common: Common,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    faultline_exit_status::exit_status(env!("CARGO_BIN_NAME"), run().await)
}

async fn run() -> anyhow::Result<()> {
    faultline_policies::init_logging();
    let args = Args::parse();
    let decisions = args.common.decisions(&[pb::Decision::MappingSize, pb::Decision::WritableOnRead]);
    let rule = pb::Rule {
        max_mapping_size: pb::MappingSize::MappingSize1g as i32,
        writable_on_read: Some(true),
        consult: args.common.consult,
        ..everywhere()
    };
    let answer = |_: &pb::ConsultRequest| pb::ConsultResponse {
        max_mapping_size: pb::MappingSize::MappingSize1g as i32,
        writable_on_read: Some(true),
        ..Default::default()
    };
    let delay = std::time::Duration::from_millis(args.common.consult_delay_ms);
    let server = PolicyServer::new(
        description("largest", &decisions),
        vec![rule],
        args.common.budget.clone(),
        Some(Box::new(answer)),
        delay,
    );
    serve(server, &args.common).await
}
