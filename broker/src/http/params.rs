//! The API's request parameters, typed: a struct per endpoint's query string
//! ([`DevicesQuery`], [`SessionsQuery`], [`NodesQuery`]), decoded by serde with unknown
//! parameters refused, and the device id of the path ([`DeviceId`]). A bad parameter is
//! answered 400 with [`ApiError::BadRequest`] saying what is wrong.
//!
//! The query string is decoded strictly before serde sees it ([`Query`]): percent-escapes must
//! be valid and decode to UTF-8, and no parameter may be given twice (a lenient decoder would
//! silently change the value asked for).

use std::fmt;

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::{Deserialize, Deserializer};

use super::error::ApiError;

/// Largest page of devices or sessions.
pub const MAX_LIMIT: u32 = 1000;
/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: u32 = 100;

/// `GET /api/v1/devices`.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DevicesQuery {
    /// Only online (`true`) or offline (`false`) devices.
    #[serde(default, deserialize_with = "online")]
    pub online: Option<bool>,
    /// Page size.
    #[serde(default = "default_limit", deserialize_with = "limit")]
    pub limit: u32,
    /// The last device id of the previous page.
    pub cursor: Option<String>,
}

/// `GET /api/v1/devices/{id}/sessions`.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionsQuery {
    /// Most sessions, newest first.
    #[serde(default = "default_limit", deserialize_with = "limit")]
    pub limit: u32,
}

/// `GET /api/v1/nodes`.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodesQuery {
    /// Only the boots of this node.
    pub node_id: Option<String>,
    /// Most boots, newest first.
    #[serde(default = "default_limit", deserialize_with = "limit")]
    pub limit: u32,
}

/// `GET /api/v1/admin/credentials`.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CredentialsQuery {
    /// Page size.
    #[serde(default = "default_limit", deserialize_with = "limit")]
    pub limit: u32,
    /// The last user name of the previous page.
    pub cursor: Option<String>,
}

fn default_limit() -> u32 {
    DEFAULT_LIMIT
}

/// `limit`: a whole number from 1 to [`MAX_LIMIT`].
fn limit<'de, D: Deserializer<'de>>(value: D) -> Result<u32, D::Error> {
    let text = String::deserialize(value)?;
    text.parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| {
            de::Error::custom(format!(
                "limit must be an integer between 1 and {MAX_LIMIT}, got {text:?}"
            ))
        })
}

/// `online`: `true` or `false`.
fn online<'de, D: Deserializer<'de>>(value: D) -> Result<Option<bool>, D::Error> {
    match String::deserialize(value)?.as_str() {
        "true" => Ok(Some(true)),
        "false" => Ok(Some(false)),
        other => Err(de::Error::custom(format!(
            "online must be true or false, got {other:?}"
        ))),
    }
}

/// A query string decoded into `T` (strictly, see the module documentation); rejected with a
/// 400 that says what is wrong.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        decode(parts.uri.query()).map(Query)
    }
}

/// The `{id}` of a device path; rejected with a 400 when it is not UTF-8 once
/// percent-decoded.
#[derive(Debug)]
pub struct DeviceId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for DeviceId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(rejection) => Err(ApiError::BadRequest(format!(
                "bad device id in the path ({}): percent-encode it as UTF-8",
                rejection.body_text()
            ))),
        }
    }
}

/// `query` decoded into `T`.
fn decode<T: DeserializeOwned>(query: Option<&str>) -> Result<T, ApiError> {
    let pairs = pairs(query)?
        .into_iter()
        .map(|(key, value)| (key, Value(value)));
    T::deserialize(de::value::MapDeserializer::new(pairs))
        .map_err(|error: ParamError| ApiError::BadRequest(error.0))
}

/// The query string's parameters in order, strictly decoded: a bad escape, bytes that are not
/// UTF-8 or a parameter given twice is refused.
fn pairs(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let mut params: Vec<(String, String)> = Vec::new();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)
            .ok_or_else(|| ApiError::BadRequest(format!("bad query parameter name {key:?}")))?;
        let value = percent_decode(value).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "bad value {value:?} of query parameter {key:?}: percent-encode it as UTF-8"
            ))
        })?;
        if params.iter().any(|(k, _)| *k == key) {
            return Err(ApiError::BadRequest(format!(
                "query parameter {key:?} given more than once"
            )));
        }
        params.push((key, value));
    }
    Ok(params)
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space); `None` on a bad escape or
/// bytes that are not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Why a query string did not fit its struct: the message for the 400.
#[derive(Debug)]
struct ParamError(String);

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParamError {}

impl de::Error for ParamError {
    fn custom<M: fmt::Display>(message: M) -> Self {
        Self(message.to_string())
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Self(format!(
            "unknown query parameter {field:?}; allowed: {}",
            expected.join(", ")
        ))
    }
}

/// A parameter's value for serde: a present parameter is `Some` of its text.
struct Value(String);

impl<'de> IntoDeserializer<'de, ParamError> for Value {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> Deserializer<'de> for Value {
    type Error = ParamError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ParamError> {
        visitor.visit_string(self.0)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ParamError> {
        visitor.visit_some(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message<T: DeserializeOwned + fmt::Debug>(query: &str) -> String {
        match decode::<T>(Some(query)) {
            Err(ApiError::BadRequest(message)) => message,
            other => panic!("{query}: {other:?}"),
        }
    }

    #[test]
    fn query_strings_are_decoded_strictly() {
        let params = pairs(Some("limit=5&cursor=a%2Fb+c&online=")).expect("valid");
        assert_eq!(
            params,
            [
                ("limit".to_owned(), "5".to_owned()),
                ("cursor".to_owned(), "a/b c".to_owned()),
                ("online".to_owned(), String::new()),
            ]
        );
        assert!(pairs(None).expect("none").is_empty());
        assert!(pairs(Some("&&")).expect("empty pairs").is_empty());
        for bad in [
            "cursor=%FF",
            "cursor=%G1",
            "cursor=%4",
            "limit=1&limit=2",
            "%C3%28=1",
        ] {
            let error = pairs(Some(bad)).expect_err(bad);
            assert!(matches!(error, ApiError::BadRequest(_)), "{bad}");
        }
        assert_eq!(pairs(Some("id=caf%C3%A9")).expect("UTF-8")[0].1, "café");
    }

    #[test]
    fn each_endpoint_gets_its_typed_parameters() {
        assert_eq!(
            decode::<DevicesQuery>(None).expect("defaults"),
            DevicesQuery {
                online: None,
                limit: DEFAULT_LIMIT,
                cursor: None
            }
        );
        assert_eq!(
            decode::<DevicesQuery>(Some("online=false&cursor=d%2F1&limit=3")).expect("valid"),
            DevicesQuery {
                online: Some(false),
                limit: 3,
                cursor: Some("d/1".to_owned())
            }
        );
        assert_eq!(
            decode::<NodesQuery>(Some("node_id=n1")).expect("valid"),
            NodesQuery {
                node_id: Some("n1".to_owned()),
                limit: DEFAULT_LIMIT
            }
        );
        assert_eq!(
            decode::<SessionsQuery>(Some("limit=1000")).expect("valid"),
            SessionsQuery { limit: 1000 }
        );
    }

    #[test]
    fn bad_parameters_say_what_is_wrong() {
        assert_eq!(
            message::<DevicesQuery>("online=maybe"),
            "online must be true or false, got \"maybe\""
        );
        assert_eq!(
            message::<DevicesQuery>("online="),
            "online must be true or false, got \"\""
        );
        for bad in ["0", "5000", "ten", "-1", ""] {
            assert_eq!(
                message::<SessionsQuery>(&format!("limit={bad}")),
                format!("limit must be an integer between 1 and 1000, got {bad:?}")
            );
        }
        assert_eq!(
            message::<DevicesQuery>("colour=red"),
            "unknown query parameter \"colour\"; allowed: online, limit, cursor"
        );
        assert_eq!(
            message::<NodesQuery>("node=n1"),
            "unknown query parameter \"node\"; allowed: node_id, limit"
        );
        assert_eq!(
            message::<SessionsQuery>("cursor=x"),
            "unknown query parameter \"cursor\"; allowed: limit"
        );
        assert_eq!(
            message::<DevicesQuery>("limit=%G1"),
            "bad value \"%G1\" of query parameter \"limit\": percent-encode it as UTF-8"
        );
        assert_eq!(
            message::<DevicesQuery>("limit=1&limit=2"),
            "query parameter \"limit\" given more than once"
        );
    }
}
