//! PolicyControl: which memory policy is in force (list, use, default,
//! status), over the [`PolicyHost`], and the working-set monitor's
//! settings.

use std::sync::Arc;

use faultline_proto::v1 as pb;
use faultline_proto::v1::policy_control_server::PolicyControl;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::access::Transport;
use super::convert;
use crate::observe::workingset::SharedSettings;
use crate::policy::host::{PolicyHost, UseError};

/// The PolicyControl service.
pub struct PolicyControlService {
    policies: Arc<PolicyHost>,
    monitor: Arc<SharedSettings>,
    transport: Transport,
}

impl PolicyControlService {
    /// The service over the policy host and the monitor's settings,
    /// reached over `transport`.
    pub fn new(policies: Arc<PolicyHost>, monitor: Arc<SharedSettings>, transport: Transport) -> Self {
        Self { policies, monitor, transport }
    }
}

impl From<UseError> for Status {
    fn from(e: UseError) -> Self {
        match e {
            UseError::BadEndpoint { .. } | UseError::Malformed { .. } => Status::invalid_argument(e.to_string()),
            UseError::Unavailable { .. } => Status::unavailable(e.to_string()),
            UseError::Cancelled => Status::aborted("superseded by another policy request"),
        }
    }
}

#[tonic::async_trait]
impl PolicyControl for PolicyControlService {
    #[instrument(skip(self, _request))]
    async fn list_policies(
        &self,
        _request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        Ok(Response::new(pb::ListPoliciesResponse { policies: self.policies.list() }))
    }

    #[instrument(skip(self, request), fields(endpoint = %request.get_ref().endpoint))]
    async fn use_policy(&self, request: Request<pb::UsePolicyRequest>) -> Result<Response<pb::PolicyStatus>, Status> {
        self.transport.permit_mutation("UsePolicy")?;
        let req = request.into_inner();
        if req.endpoint.is_empty() {
            return Err(Status::invalid_argument("endpoint is empty"));
        }
        let status = self.policies.use_policy(&req.endpoint, req.reconnect).await?;
        Ok(Response::new(status))
    }

    #[instrument(skip(self, _request))]
    async fn use_default(
        &self,
        _request: Request<pb::UseDefaultRequest>,
    ) -> Result<Response<pb::PolicyStatus>, Status> {
        self.transport.permit_mutation("UseDefault")?;
        Ok(Response::new(self.policies.use_default()))
    }

    #[instrument(skip(self, _request))]
    async fn get_policy_status(
        &self,
        _request: Request<pb::GetPolicyStatusRequest>,
    ) -> Result<Response<pb::PolicyStatus>, Status> {
        Ok(Response::new(self.policies.status()))
    }

    #[instrument(skip(self, _request))]
    async fn get_working_set_monitor(
        &self,
        _request: Request<pb::GetWorkingSetMonitorRequest>,
    ) -> Result<Response<pb::WorkingSetMonitorSettings>, Status> {
        Ok(Response::new(convert::monitor_settings(&self.monitor.get())))
    }

    #[instrument(skip(self, request))]
    async fn set_working_set_monitor(
        &self,
        request: Request<pb::WorkingSetMonitorSettings>,
    ) -> Result<Response<pb::WorkingSetMonitorSettings>, Status> {
        self.transport.permit_mutation("SetWorkingSetMonitor")?;
        let settings = convert::monitor_settings_from(request.get_ref())?;
        self.monitor.set(settings);
        tracing::info!(?settings, "working-set monitor settings changed");
        Ok(Response::new(convert::monitor_settings(&settings)))
    }
}
