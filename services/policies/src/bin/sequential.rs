//! `policy-sequential`: 4 KiB mappings with a fault-around window: each
//! fault also maps the next `--window` pages, so a sequential stream faults
//! once per window instead of once per page, and tracking stays at 4 KiB.

use clap::Parser;
use faultline_policies::{description, everywhere, serve, Common, PolicyServer};
use faultline_proto::v1 as pb;

#[derive(Parser)]
#[command(about = "Faultline memory policy: 4 KiB mappings with fault-around")]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Pages after the faulting one to map with it (at most 64).
    #[arg(long, default_value_t = 15)]
    window: u32,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    faultline_exit_status::exit_status(env!("CARGO_BIN_NAME"), run().await)
}

async fn run() -> anyhow::Result<()> {
    faultline_policies::init_logging();
    let args = Args::parse();
    let decisions = args.common.decisions(&[pb::Decision::MappingSize, pb::Decision::FaultAround]);
    let window = args.window;
    let rule = pb::Rule {
        max_mapping_size: pb::MappingSize::MappingSize4k as i32,
        fault_around_pages: Some(window),
        consult: args.common.consult,
        ..everywhere()
    };
    let answer = move |_: &pb::ConsultRequest| pb::ConsultResponse {
        max_mapping_size: pb::MappingSize::MappingSize4k as i32,
        fault_around_pages: Some(window),
        ..Default::default()
    };
    let delay = std::time::Duration::from_millis(args.common.consult_delay_ms);
    let server = PolicyServer::new(
        description("sequential-4k", &decisions),
        vec![rule],
        args.common.budget.clone(),
        Some(Box::new(answer)),
        delay,
    );
    serve(server, &args.common).await
}
