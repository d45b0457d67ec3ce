//! Errors: library errors (typed) and what a client is told (JSON, a 4xx
//! or 5xx status, the field or column at fault — never a stack trace).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// What a request got wrong, or why it could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No model line of that name is served.
    #[error("no model line '{0}' is served here")]
    UnknownLine(String),
    /// The line has no production model (yet).
    #[error("model line '{0}' has no production model")]
    NoModel(String),
    /// The body is not what the content type says.
    #[error("{0}")]
    Malformed(String),
    /// A column the model does not use.
    #[error("unknown column '{column}' (the model reads {expected})")]
    UnknownColumn {
        /// The column.
        column: String,
        /// The model's feature columns.
        expected: String,
    },
    /// A feature column is missing.
    #[error("row {row}: missing column '{column}'")]
    MissingColumn {
        /// 1-based row.
        row: usize,
        /// The column.
        column: String,
    },
    /// A value is not a finite number.
    #[error("row {row}, column '{column}': {found} is not a number")]
    WrongType {
        /// 1-based row.
        row: usize,
        /// The column.
        column: String,
        /// What was there.
        found: String,
    },
    /// Too many rows in one request.
    #[error("{rows} rows in one request; at most {max}")]
    TooManyRows {
        /// Rows sent.
        rows: usize,
        /// The limit.
        max: usize,
    },
    /// The body is larger than allowed.
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    /// A content type the server does not read.
    #[error("content type '{0}' is not served (application/json or text/csv)")]
    UnsupportedType(String),
    /// The body did not arrive in time.
    #[error("the request did not complete within {0} ms")]
    Timeout(u128),
    /// No or a wrong bearer token.
    #[error("a valid bearer token is required")]
    Unauthorized,
    /// Feedback for a request the server does not remember.
    #[error("unknown request id '{0}' (never answered here, or forgotten)")]
    UnknownRequest(String),
    /// The repository could not be read or written.
    #[error("{0}")]
    Repo(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::UnknownLine(_) | ApiError::UnknownRequest(_) => StatusCode::NOT_FOUND,
            ApiError::NoModel(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::UnknownColumn { .. }
            | ApiError::MissingColumn { .. }
            | ApiError::WrongType { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRows { .. } | ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Repo(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::UnknownLine(_) => "unknown_line",
            ApiError::NoModel(_) => "no_model",
            ApiError::Malformed(_) => "malformed",
            ApiError::UnknownColumn { .. } => "unknown_column",
            ApiError::MissingColumn { .. } => "missing_column",
            ApiError::WrongType { .. } => "wrong_type",
            ApiError::TooManyRows { .. } => "too_many_rows",
            ApiError::TooLarge(_) => "too_large",
            ApiError::UnsupportedType(_) => "unsupported_type",
            ApiError::Timeout(_) => "timeout",
            ApiError::Unauthorized => "unauthorized",
            ApiError::UnknownRequest(_) => "unknown_request",
            ApiError::Repo(_) => "repository",
        }
    }

    fn column(&self) -> Option<&str> {
        match self {
            ApiError::UnknownColumn { column, .. }
            | ApiError::MissingColumn { column, .. }
            | ApiError::WrongType { column, .. } => Some(column),
            _ => None,
        }
    }

    fn row(&self) -> Option<usize> {
        match self {
            ApiError::MissingColumn { row, .. } | ApiError::WrongType { row, .. } => Some(*row),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({
            "code": self.code(),
            "message": self.to_string(),
        });
        if let Some(c) = self.column() {
            body["column"] = serde_json::json!(c);
        }
        if let Some(r) = self.row() {
            body["row"] = serde_json::json!(r);
        }
        let mut r = (
            self.status(),
            axum::Json(serde_json::json!({ "error": body })),
        )
            .into_response();
        if matches!(self, ApiError::Unauthorized) {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// Errors of starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The repository.
    #[error(transparent)]
    Repo(#[from] dsv::Error),
    /// The runtime (change feed).
    #[error(transparent)]
    Runtime(#[from] dsv_runtime::Error),
    /// A model body that does not decode.
    #[error("model {id} does not decode: {message}")]
    Model {
        /// The model.
        id: String,
        /// Why.
        message: String,
    },
    /// Options that cannot work together.
    #[error("{0}")]
    Options(String),
    /// The listener.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// This crate's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
