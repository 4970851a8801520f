//! The `/v1` config API (filled in by the foundation work).

use axum::Router;

use super::AppState;

pub(super) fn routes(state: AppState) -> Router {
    Router::new().with_state(state)
}
