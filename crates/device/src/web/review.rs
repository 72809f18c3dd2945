//! The review of captured frames over HTTP (`run --http … --capture DIR`):
//! the routes over [`crate::capture::review::Store`], merged into the web
//! view's router behind its token check and client limit.
//!
//! - `GET /api/captures?page=&per_page=&label=&unreviewed=`: one page, newest first;
//! - `GET /api/captures/image?id=LABEL/FILE.jpg`: the JPEG;
//! - `POST /api/captures/confirm` `{"id": …}`: mark it reviewed as filed;
//! - `POST /api/captures/move` `{"id": …, "label": …}`: file it under another (or a new) label;
//! - `POST /api/captures/delete` `{"id": …}`: delete it and its sidecar.
//!
//! Errors are JSON `{"error": …}` with the store's status (400 bad id or
//! label, 404 no such capture, 409 already there, 500 disk).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::capture::review::{ListRequest, MoveRequest, ReviewError, Store};

/// Largest capture image served, bytes (captures are camera frames as JPEG).
const MAX_IMAGE: u64 = 32 << 20;

/// A request naming one capture.
#[derive(Debug, Deserialize, Serialize)]
pub struct IdRequest {
    /// The capture's id, `<label folder>/<file>.jpg`.
    pub id: String,
}

/// The review routes over the captures in `store`.
pub fn routes(store: Store) -> Router {
    let store = Arc::new(store);
    Router::new()
        .route("/api/captures", get(list))
        .route("/api/captures/image", get(image))
        .route("/api/captures/confirm", post(confirm))
        .route("/api/captures/move", post(relabel))
        .route("/api/captures/delete", post(delete))
        .with_state(store)
}

fn failed(e: ReviewError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(serde_json::json!({ "error": format!("{e}") }))).into_response()
}

/// Runs `f` on the store off the server's one runtime thread (it touches the
/// disk) and answers with its JSON or its error.
async fn blocking<T, F>(store: Arc<Store>, f: F) -> Response
where
    T: Serialize + Send + 'static,
    F: FnOnce(&Store) -> Result<T, ReviewError> + Send + 'static,
{
    match tokio::task::spawn_blocking(move || f(&store)).await {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => failed(e),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, Json(serde_json::json!({ "error": "the review task failed" })))
            .into_response(),
    }
}

async fn list(State(store): State<Arc<Store>>, Query(req): Query<ListRequest>) -> Response {
    blocking(store, move |s| s.list(&req)).await
}

async fn confirm(State(store): State<Arc<Store>>, Json(req): Json<IdRequest>) -> Response {
    blocking(store, move |s| s.confirm(&req.id)).await
}

async fn relabel(State(store): State<Arc<Store>>, Json(req): Json<MoveRequest>) -> Response {
    blocking(store, move |s| s.relabel(&req)).await
}

async fn delete(State(store): State<Arc<Store>>, Json(req): Json<IdRequest>) -> Response {
    blocking(store, move |s| s.delete(&req.id)).await
}

async fn image(State(store): State<Arc<Store>>, Query(req): Query<IdRequest>) -> Response {
    let read = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, Response> {
        let path = store.image_path(&req.id).map_err(failed)?;
        tern_model_format::files::read_regular(&path, MAX_IMAGE, "capture").map_err(|e| {
            (StatusCode::INTERNAL_SERVER_ERROR, Json(serde_json::json!({ "error": format!("{e:#}") }))).into_response()
        })
    })
    .await;
    match read {
        Ok(Ok(bytes)) => ([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "no-store")], bytes).into_response(),
        Ok(Err(r)) => r,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
