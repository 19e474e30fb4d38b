//! The HTTP side: TLS accept, routing, list and watch.

use std::{
    convert::Infallible,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::{
    Resource,
    api::{core::v1::Endpoints, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::WatchEvent,
};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};

use super::{
    Inner,
    store::{self, Broadcast, Kind, Selection},
};

type Body = BoxBody<Bytes, Infallible>;

pub(super) async fn accept_loop(listener: tokio::net::TcpListener, tls: Arc<rustls::ServerConfig>, inner: Arc<Inner>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let conn_inner = inner.clone();
        let task = tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let svc = service_fn(move |req| {
                let inner = conn_inner.clone();
                async move { Ok::<_, Infallible>(handle(inner, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
        let mut conns = inner.conns.lock().unwrap();
        conns.retain(|h| !h.is_finished());
        conns.push(task.abort_handle());
    }
}

fn full(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("response")
}

fn error(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        StatusCode::from_u16(code).expect("status code"),
        serde_json::to_vec(&store::status(code, reason, message)).expect("serialize status"),
    )
}

fn not_found() -> Response<Body> {
    error(404, "NotFound", "the server could not find the requested resource")
}

fn handle(inner: Arc<Inner>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (kind, namespace) = match segs.as_slice() {
        ["apis", "discovery.k8s.io", "v1", "namespaces", ns, "endpointslices"] => (Kind::EndpointSlice, Some(*ns)),
        ["apis", "discovery.k8s.io", "v1", "endpointslices"] => (Kind::EndpointSlice, None),
        ["api", "v1", "namespaces", ns, "endpoints"] => (Kind::Endpoints, Some(*ns)),
        ["api", "v1", "endpoints"] => (Kind::Endpoints, None),
        _ => {
            log(&inner, format!("OTHER {path}"));
            return not_found();
        }
    };
    let watch = matches!(q("watch"), Some("true" | "1"));
    let kind_name = match kind {
        Kind::EndpointSlice => "endpointslices",
        Kind::Endpoints => "endpoints",
    };
    let line = format!(
        "{} {kind_name} {} rv={} labels={} fields={}",
        if watch { "WATCH" } else { "LIST" },
        namespace.unwrap_or("*"),
        q("resourceVersion").unwrap_or(""),
        q("labelSelector").unwrap_or(""),
        q("fieldSelector").unwrap_or(""),
    );
    log(&inner, line);
    if req.method() != hyper::Method::GET {
        return error(405, "MethodNotAllowed", "only GET is served");
    }
    if *inner.forbidden.lock().unwrap() {
        return error(403, "Forbidden", &format!("User \"nllb\" cannot list resource \"{kind_name}\""));
    }
    if kind == Kind::EndpointSlice && !*inner.serve_slices.lock().unwrap() {
        return not_found();
    }
    let mut sel = Selection { kind, namespace: namespace.map(str::to_string), labels: Vec::new(), name: None };
    for term in q("labelSelector").unwrap_or("").split(',').filter(|t| !t.is_empty()) {
        let Some((k, v)) = term.split_once('=') else {
            return error(400, "BadRequest", &format!("unsupported label selector {term:?}"));
        };
        sel.labels.push((k.trim_end_matches('=').to_string(), v.to_string()));
    }
    for term in q("fieldSelector").unwrap_or("").split(',').filter(|t| !t.is_empty()) {
        match term.split_once('=') {
            Some(("metadata.name", v)) => sel.name = Some(v.to_string()),
            Some(("metadata.namespace", v)) => sel.namespace = Some(v.to_string()),
            _ => {
                return error(400, "BadRequest", &format!("unsupported field selector {term:?}"));
            }
        }
    }
    if watch {
        let timeout = q("timeoutSeconds").and_then(|t| t.parse().ok()).map(Duration::from_secs);
        let bookmarks = matches!(q("allowWatchBookmarks"), Some("true" | "1"));
        start_watch(inner, sel, q("resourceVersion").unwrap_or("").to_string(), timeout, bookmarks)
    } else {
        list(&inner, &sel)
    }
}

fn log(inner: &Inner, line: String) {
    inner.requests.lock().unwrap().push(line);
}

fn matching(st: &store::Store, sel: &Selection) -> Vec<Value> {
    let map = match sel.kind {
        Kind::EndpointSlice => &st.slices,
        Kind::Endpoints => &st.endpoints,
    };
    map.iter()
        .filter(|((ns, name), v)| sel.matches(sel.kind, ns, name, &store::labels_of(v)))
        .map(|(_, v)| v.clone())
        .collect()
}

fn list(inner: &Inner, sel: &Selection) -> Response<Body> {
    let st = inner.store.lock().unwrap();
    let items = matching(&st, sel);
    let (api_version, kind) = match sel.kind {
        Kind::EndpointSlice => (EndpointSlice::API_VERSION, "EndpointSliceList"),
        Kind::Endpoints => (Endpoints::API_VERSION, "EndpointsList"),
    };
    let body = serde_json::json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items,
    });
    full(StatusCode::OK, serde_json::to_vec(&body).expect("serialize list"))
}

fn start_watch(
    inner: Arc<Inner>,
    sel: Selection,
    rv: String,
    timeout: Option<Duration>,
    bookmarks: bool,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    // Snapshot and subscribe under one lock so no change falls in between.
    let (backlog, events, current_rv) = {
        let st = inner.store.lock().unwrap();
        let events = inner.events.subscribe();
        let backlog: Result<Vec<Vec<u8>>, u64> = match rv.parse::<u64>() {
            // No (or "0") resourceVersion: start with the current state as ADDED.
            Err(_) | Ok(0) => Ok(matching(&st, &sel).into_iter().map(|o| store::line(&WatchEvent::Added(o))).collect()),
            Ok(from) if from + 1 < st.oldest_watchable => Err(from),
            Ok(from) => Ok(st
                .history
                .iter()
                .filter(|c| c.rv > from && sel.matches(c.kind, &c.namespace, &c.name, &c.labels))
                .map(|c| c.line.clone())
                .collect()),
        };
        (backlog, events, st.rv)
    };
    let _ = current_rv;
    let every = inner.bookmark_every;
    tokio::spawn(async move {
        match backlog {
            Err(from) => {
                inner.gone_sent.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(Bytes::from(store::gone_line(from))).await;
            }
            Ok(lines) => {
                for l in lines {
                    if tx.send(Bytes::from(l)).await.is_err() {
                        return;
                    }
                }
                pump(inner, sel, events, tx, timeout, bookmarks, every).await;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .expect("response")
}

/// Forwards matching changes until the timeout, a 410, or the client leaving.
async fn pump(
    inner: Arc<Inner>,
    sel: Selection,
    mut events: broadcast::Receiver<Broadcast>,
    tx: mpsc::Sender<Bytes>,
    timeout: Option<Duration>,
    bookmarks: bool,
    every: Duration,
) {
    inner.open_watches.fetch_add(1, Ordering::SeqCst);
    let _open = OpenWatch(inner.clone());
    let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(3600)));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        let line = tokio::select! {
            _ = &mut deadline => return,
            _ = tick.tick() => {
                if !bookmarks {
                    // Still notice a client that went away.
                    if tx.is_closed() { return } else { continue }
                }
                let rv = inner.store.lock().unwrap().rv;
                inner.bookmarks.lock().unwrap().push(rv);
                store::bookmark_line(sel.kind, rv)
            }
            ev = events.recv() => match ev {
                Ok(Broadcast::Change(c)) => {
                    if !sel.matches(c.kind, &c.namespace, &c.name, &c.labels) { continue }
                    c.line.clone()
                }
                Ok(Broadcast::Gone) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    let rv = inner.store.lock().unwrap().rv;
                    inner.gone_sent.fetch_add(1, Ordering::SeqCst);
                    let _ = tx.send(Bytes::from(store::gone_line(rv))).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if tx.send(Bytes::from(line)).await.is_err() {
            return;
        }
    }
}

struct OpenWatch(Arc<Inner>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `a=b&c=d` with percent-decoding (selectors arrive encoded).
fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
