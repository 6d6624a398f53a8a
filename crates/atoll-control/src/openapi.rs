//! The OpenAPI 3.1 document of the REST API, served at `/openapi.json`.

use atoll_api::rest::{
    ApplyRequest, ApplyResponse, AuditResponse, BarrierRequest, BarrierResponse, ChangeAction,
    ChangeSummary, CommitChange, CommitRecord, ErrorBody, ErrorCode, HistoryItem, HistoryResponse,
    Laggard, LeaderResponse, ListResponse, ManifestFile, NackInfo, NodeInfo, NodeSelector,
    NodesResponse, PlanCheck, RegisteredInstance, RegistryResponse, ReplicaInfo, ReportedPositions,
    ReportedShard, ResourceRef, RollbackRequest, StatusResponse, SwitchoverPlan, SwitchoverRequest,
    TokenCreated, TokenInfo, TokenList, TokenRequest, WhoAmI,
};
use atoll_model::Issue;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Atoll control plane",
        description = "Resources (regions, zones, cells, shard rules and maps, services, routes, gateways), their history and audit log, data-plane nodes and barriers. Manifests are documented in docs/manifests.md.",
    ),
    paths(
        crate::rest::healthz,
        crate::rest::readyz,
        crate::rest::metrics,
        crate::rest::status,
        crate::rest::leader,
        crate::rest::apply,
        crate::rest::list_all,
        crate::rest::list,
        crate::rest::get_one,
        crate::rest::delete_one,
        crate::rest::history,
        crate::rest::rollback,
        crate::rest::audit,
        crate::rest::watch,
        crate::rest::nodes,
        crate::rest::forget_node,
        crate::rest::registry,
        crate::rest::barrier,
        crate::rest::start_switchover,
        crate::rest::abort_switchover,
        crate::rest::approve_switchover,
        crate::audit::chain,
        crate::join::ca,
        crate::join::join,
        crate::join::renew,
        crate::join::instance_certificate,
        crate::tokens::create_token,
        crate::tokens::list_tokens,
        crate::tokens::revoke_token,
        crate::tokens::whoami,
        crate::approvals::list_approvals,
        crate::approvals::get_approval,
        crate::approvals::approve_approval,
        crate::approvals::reject_approval,
    ),
    components(schemas(
        SwitchoverRequest,
        SwitchoverPlan,
        PlanCheck,
        ApplyRequest,
        ApplyResponse,
        AuditResponse,
        BarrierRequest,
        BarrierResponse,
        ChangeAction,
        ChangeSummary,
        CommitChange,
        CommitRecord,
        ErrorBody,
        ErrorCode,
        HistoryItem,
        HistoryResponse,
        Laggard,
        LeaderResponse,
        ReplicaInfo,
        ListResponse,
        ManifestFile,
        NackInfo,
        NodeInfo,
        NodeSelector,
        NodesResponse,
        RegistryResponse,
        RegisteredInstance,
        ReportedPositions,
        ReportedShard,
        ResourceRef,
        RollbackRequest,
        StatusResponse,
        TokenRequest,
        atoll_api::rest::JoinRequest,
        atoll_api::rest::RenewRequest,
        atoll_api::rest::InstanceCertificateRequest,
        atoll_api::rest::IssuedCertificate,
        atoll_api::rest::CaInfo,
        atoll_audit::ChainPage,
        atoll_audit::AuditEntry,
        atoll_audit::AuditHead,
        TokenCreated,
        TokenInfo,
        TokenList,
        WhoAmI,
        atoll_api::rest::ApprovalInfo,
        atoll_api::rest::ApprovalPending,
        atoll_api::rest::ApprovalList,
        atoll_api::rest::ApprovalDecision,
        Issue
    ))
)]
struct ApiDoc;

/// The document as pretty JSON.
pub(crate) fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}
