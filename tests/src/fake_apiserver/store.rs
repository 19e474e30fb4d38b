//! The fake API server's objects, resource versions and watch history.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    Resource,
    api::{core::v1::Endpoints, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::{ListMeta, Status, WatchEvent},
};
use serde::Serialize;
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    EndpointSlice,
    Endpoints,
}

/// One change, as every watcher that matches it will see it.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The watch event line (JSON + '\n').
    pub line: Vec<u8>,
}

/// What travels to open watches.
#[derive(Debug, Clone)]
pub enum Broadcast {
    Change(Arc<Change>),
    /// Every open watch gets `ERROR 410 Gone` and ends.
    Gone,
}

#[derive(Default)]
pub struct Store {
    pub rv: u64,
    pub slices: BTreeMap<(String, String), Value>,
    pub endpoints: BTreeMap<(String, String), Value>,
    pub history: Vec<Arc<Change>>,
    /// A watch from an older resourceVersion gets 410 Gone.
    pub oldest_watchable: u64,
}

/// A request's selection: kind, namespace (None: all) and selectors.
#[derive(Clone, Debug)]
pub struct Selection {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub labels: Vec<(String, String)>,
    pub name: Option<String>,
}

impl Selection {
    pub fn matches(&self, kind: Kind, ns: &str, name: &str, labels: &BTreeMap<String, String>) -> bool {
        kind == self.kind
            && self.namespace.as_deref().is_none_or(|n| n == ns)
            && self.name.as_deref().is_none_or(|n| n == name)
            && self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

pub fn line<T: Serialize>(v: &T) -> Vec<u8> {
    let mut l = serde_json::to_vec(v).expect("serialize");
    l.push(b'\n');
    l
}

/// The Status of a 410 for a watch that fell behind, as kube-apiserver sends it.
pub fn gone_status(rv: u64) -> Status {
    Status {
        code: Some(410),
        message: Some(format!("too old resource version: {rv}")),
        reason: Some("Expired".into()),
        status: Some("Failure".into()),
        metadata: ListMeta::default(),
        ..Default::default()
    }
}

pub fn gone_line(rv: u64) -> Vec<u8> {
    line(&WatchEvent::<EndpointSlice>::ErrorStatus(gone_status(rv)))
}

/// A BOOKMARK event. Built by hand: kube-apiserver puts apiVersion and kind
/// in the bookmark object (kube-rs requires them), k8s-openapi's
/// `WatchEvent::Bookmark` serializer leaves them out.
pub fn bookmark_line(kind: Kind, rv: u64) -> Vec<u8> {
    let (api_version, kind) = match kind {
        Kind::EndpointSlice => (EndpointSlice::API_VERSION, EndpointSlice::KIND),
        Kind::Endpoints => (Endpoints::API_VERSION, Endpoints::KIND),
    };
    line(&serde_json::json!({
        "type": "BOOKMARK",
        "object": {"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv.to_string()}},
    }))
}

pub fn status(code: u16, reason: &str, message: &str) -> Status {
    Status {
        code: Some(code.into()),
        message: Some(message.into()),
        reason: Some(reason.into()),
        status: Some("Failure".into()),
        ..Default::default()
    }
}

pub fn labels_of(v: &Value) -> BTreeMap<String, String> {
    v.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default()
}
