//! The WorkingSet service: what each VM's working-set monitor saw, as the
//! latest aggregation or a stream of them.

use std::pin::Pin;
use std::sync::{Arc, Weak};

use faultline_proto::v1::working_set_server::WorkingSet;
use faultline_proto::v1::{self as pb, GetWorkingSetRequest};
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert;
use crate::attach::registry::VmTable;
use crate::link::vm::AttachedVm;

type AggregationStream = Pin<Box<dyn Stream<Item = Result<pb::WorkingSetAggregation, Status>> + Send>>;

/// The WorkingSet service.
pub struct WorkingSetService {
    vms: Arc<VmTable>,
    shutdown: CancellationToken,
}

impl WorkingSetService {
    /// The service over the attached `vms`; its streams end at `shutdown`.
    pub fn new(vms: Arc<VmTable>, shutdown: CancellationToken) -> Self {
        Self { vms, shutdown }
    }

    fn vm(&self, vm_id: u32) -> Result<Arc<AttachedVm>, Status> {
        self.vms.get(vm_id).ok_or_else(|| Status::not_found(format!("vm {vm_id} is not attached")))
    }
}

#[tonic::async_trait]
impl WorkingSet for WorkingSetService {
    #[instrument(skip(self, request))]
    async fn get_working_set(
        &self,
        request: Request<GetWorkingSetRequest>,
    ) -> Result<Response<pb::WorkingSetAggregation>, Status> {
        let vm_id = request.into_inner().vm_id;
        let vm = self.vm(vm_id)?;
        let Some(seen) = vm.working_set.latest() else {
            return Err(Status::failed_precondition(format!(
                "vm {vm_id} has no working-set aggregation: it is not monitored ([working_set] enabled, \
                 `faultline workingset --enable`, or a policy that names the working set), or has not aggregated yet"
            )));
        };
        Ok(Response::new(convert::working_set(&vm, &seen)))
    }

    type WatchWorkingSetStream = AggregationStream;

    #[instrument(skip(self, request))]
    async fn watch_working_set(
        &self,
        request: Request<GetWorkingSetRequest>,
    ) -> Result<Response<AggregationStream>, Status> {
        let vm = self.vm(request.into_inner().vm_id)?;
        let follow = WatchStream::new(vm.working_set.follow());
        // Only a weak reference: the stream ends when the VM detaches (its
        // monitor's sender goes with it), not keeps it.
        let vm: Weak<AttachedVm> = Arc::downgrade(&vm);
        let stream = follow.filter_map(move |seen| {
            let (seen, vm) = (seen?, vm.upgrade()?);
            Some(Ok(convert::working_set(&vm, &seen)))
        });
        let shutdown = self.shutdown.clone();
        let stream = futures_util::StreamExt::take_until(stream, async move { shutdown.cancelled().await });
        Ok(Response::new(Box::pin(stream)))
    }
}
