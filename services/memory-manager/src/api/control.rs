//! The Control service: what is attached, dirty logs and access logs.

use std::sync::Arc;

use faultline_proto::v1::control_server::Control;
use faultline_proto::v1::{
    self as pb, GetAccessLogRequest, GetDirtyLogRequest, GetVmRequest, ListVmsRequest, ListVmsResponse,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::access::Transport;
use super::convert;
use crate::attach::registry::VmTable;
use crate::link::{access, dirty};

/// The Control service.
pub struct ControlService {
    vms: Arc<VmTable>,
    transport: Transport,
}

impl ControlService {
    /// The service over the attached `vms`, reached over `transport`.
    pub fn new(vms: Arc<VmTable>, transport: Transport) -> Self {
        Self { vms, transport }
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    #[instrument(skip(self, _request))]
    async fn list_vms(&self, _request: Request<ListVmsRequest>) -> Result<Response<ListVmsResponse>, Status> {
        let mut vms: Vec<pb::Vm> = self.vms.list().iter().map(|v| convert::vm(v)).collect();
        vms.sort_by_key(|v| v.vm_id);
        Ok(Response::new(ListVmsResponse { vms }))
    }

    #[instrument(skip(self, request))]
    async fn get_vm(&self, request: Request<GetVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let id = request.into_inner().vm_id;
        let vm = self.vms.get(id);
        vm.map(|v| Response::new(convert::vm(&v))).ok_or_else(|| Status::not_found(format!("vm {id} is not attached")))
    }

    #[instrument(skip(self, request))]
    async fn get_dirty_log(&self, request: Request<GetDirtyLogRequest>) -> Result<Response<pb::DirtyLog>, Status> {
        let GetDirtyLogRequest { vm_id, memslot, peek } = request.into_inner();
        // Before any lookup: a denied caller learns nothing about the VMs.
        if !peek {
            self.transport.permit_mutation("GetDirtyLog without peek (it clears the log)")?;
        }
        let vm = self.vms.get(vm_id).ok_or_else(|| Status::not_found(format!("vm {vm_id} is not attached")))?;
        let Some(slot) = vm.layout.memslots.by_id(memslot as usize) else {
            return Err(Status::not_found(format!("vm {vm_id} has no memslot {memslot}")));
        };
        let (gpa, pages, dirty_log, id) = (slot.gpa.raw(), slot.pages(), slot.dirty_log, slot.id);
        if !dirty_log {
            return Err(Status::failed_precondition(format!("memslot {memslot} of vm {vm_id} has no dirty logging")));
        }
        // Write-protecting waits for the core: off the async workers.
        let (bitmap, write_protects) = tokio::task::spawn_blocking(move || {
            let slot = vm.layout.memslots.by_id(id).expect("memslots never change after attach");
            if peek {
                Ok((vm.mapping.dirty_log(slot).peek(), 0))
            } else {
                dirty::fetch_and_clear(&vm.mapping, &vm.control, slot).map(|log| (log.bitmap, log.write_protects))
            }
        })
        .await
        .map_err(|e| Status::internal(format!("dirty log task failed: {e}")))?
        .map_err(|e| Status::unavailable(format!("re-arming dirty logging failed, bitmap kept: {e}")))?;
        Ok(Response::new(pb::DirtyLog {
            vm_id,
            memslot,
            gpa,
            pages,
            dirty_pages: bitmap.iter().map(|w| w.count_ones() as u64).sum(),
            bitmap: bitmap.iter().flat_map(|w| w.to_le_bytes()).collect(),
            write_protect_commands: write_protects,
        }))
    }

    #[instrument(skip(self, request))]
    async fn get_access_log(&self, request: Request<GetAccessLogRequest>) -> Result<Response<pb::AccessLog>, Status> {
        let GetAccessLogRequest { vm_id, memslot } = request.into_inner();
        // Before any lookup: a denied caller learns nothing about the VMs.
        self.transport.permit_mutation("GetAccessLog (it clears the access flags)")?;
        let vm = self.vms.get(vm_id).ok_or_else(|| Status::not_found(format!("vm {vm_id} is not attached")))?;
        let Some(slot) = vm.layout.memslots.by_id(memslot as usize) else {
            return Err(Status::not_found(format!("vm {vm_id} has no memslot {memslot}")));
        };
        let (gpa, pages, id) = (slot.gpa.raw(), slot.pages(), slot.id);
        // Waits for the core: off the async workers.
        let log = tokio::task::spawn_blocking(move || {
            let slot = vm.layout.memslots.by_id(id).expect("memslots never change after attach");
            access::fetch_and_clear(&vm.control, slot)
        })
        .await
        .map_err(|e| Status::internal(format!("access log task failed: {e}")))?
        .map_err(|e| Status::unavailable(format!("reading the access flags failed: {e}")))?;
        Ok(Response::new(pb::AccessLog {
            vm_id,
            memslot,
            gpa,
            pages,
            accessed_pages: log.bitmap.iter().map(|w| w.count_ones() as u64).sum(),
            bitmap: log.bitmap.iter().flat_map(|w| w.to_le_bytes()).collect(),
            age_commands: log.commands,
        }))
    }
}
