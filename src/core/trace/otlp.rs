//! The few OTLP trace messages tollgate sends (`ExportTraceServiceRequest` and what it holds),
//! written as prost structs with the field numbers of the OpenTelemetry protocol's
//! `opentelemetry/proto/{collector/trace,trace,common,resource}/v1` files. Fields tollgate never
//! sets (events, links, dropped counts) are left out: an absent field decodes as its default.

/// The body of `POST /v1/traces`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

/// The spans of one resource (one tollgate process).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

/// What produced the spans: `service.name` and friends.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

/// The spans of one instrumentation scope.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<Span>,
    #[prost(string, tag = "3")]
    pub schema_url: String,
}

/// The instrumentation library's name and version.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InstrumentationScope {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

/// One finished span.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Span {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    #[prost(string, tag = "3")]
    pub trace_state: String,
    /// Empty for a root span.
    #[prost(bytes = "vec", tag = "4")]
    pub parent_span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    pub name: String,
    /// One of the `SPAN_KIND_*` constants.
    #[prost(int32, tag = "6")]
    pub kind: i32,
    #[prost(fixed64, tag = "7")]
    pub start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    pub end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    #[prost(message, repeated, tag = "11")]
    pub events: Vec<Event>,
    #[prost(message, optional, tag = "15")]
    pub status: Option<Status>,
    /// The W3C trace flags in the low 8 bits.
    #[prost(fixed32, tag = "16")]
    pub flags: u32,
}

/// Something that happened at one moment of a span.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(fixed64, tag = "1")]
    pub time_unix_nano: u64,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "3")]
    pub attributes: Vec<KeyValue>,
}

/// `Span.kind`: the span covers the server side of a remote call.
pub const SPAN_KIND_SERVER: i32 = 2;
/// `Span.kind`: the span covers a call to a remote service.
pub const SPAN_KIND_CLIENT: i32 = 3;

/// A span's final status.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(string, tag = "2")]
    pub message: String,
    /// One of the `STATUS_CODE_*` constants.
    #[prost(int32, tag = "3")]
    pub code: i32,
}

/// `Status.code`: the span contains an error.
pub const STATUS_CODE_ERROR: i32 = 2;

/// One attribute.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

/// An attribute value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    #[prost(oneof = "any_value::Value", tags = "1, 2, 3, 4, 5")]
    pub value: Option<any_value::Value>,
}

/// The variants of [`AnyValue`].
pub mod any_value {
    /// The one value an [`AnyValue`](super::AnyValue) holds.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(string, tag = "1")]
        StringValue(String),
        #[prost(bool, tag = "2")]
        BoolValue(bool),
        #[prost(int64, tag = "3")]
        IntValue(i64),
        #[prost(double, tag = "4")]
        DoubleValue(f64),
        #[prost(message, tag = "5")]
        ArrayValue(super::ArrayValue),
    }
}

/// A list of values (`gen_ai.response.finish_reasons`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ArrayValue {
    #[prost(message, repeated, tag = "1")]
    pub values: Vec<AnyValue>,
}

impl KeyValue {
    /// A string attribute.
    pub fn string(key: &str, value: impl Into<String>) -> KeyValue {
        KeyValue::of(key, any_value::Value::StringValue(value.into()))
    }

    /// An integer attribute.
    pub fn int(key: &str, value: i64) -> KeyValue {
        KeyValue::of(key, any_value::Value::IntValue(value))
    }

    /// A string-array attribute.
    pub fn strings(key: &str, values: &[String]) -> KeyValue {
        let values = values
            .iter()
            .map(|v| AnyValue {
                value: Some(any_value::Value::StringValue(v.clone())),
            })
            .collect();
        KeyValue::of(key, any_value::Value::ArrayValue(ArrayValue { values }))
    }

    fn of(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: Some(AnyValue { value: Some(value) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The wire types a collector expects (fixed64 times, fixed32 flags, varint kind): a wrong
    /// prost type here would still decode with these same structs, so check the bytes.
    #[test]
    fn span_fields_have_the_otlp_wire_types() {
        let span = Span {
            kind: SPAN_KIND_SERVER,
            start_time_unix_nano: 7,
            end_time_unix_nano: 9,
            flags: 1,
            ..Span::default()
        };
        let b = span.encode_to_vec();
        let has = |needle: &[u8]| b.windows(needle.len()).any(|w| w == needle);
        assert!(has(&[0x30, 0x02]), "kind: field 6, varint: {b:02x?}");
        assert!(
            has(&[0x39, 7, 0, 0, 0, 0, 0, 0, 0]),
            "start: field 7, fixed64"
        );
        assert!(
            has(&[0x41, 9, 0, 0, 0, 0, 0, 0, 0]),
            "end: field 8, fixed64"
        );
        assert!(has(&[0x85, 0x01, 1, 0, 0, 0]), "flags: field 16, fixed32");
        let kv = KeyValue::int("n", 5).encode_to_vec();
        // key (field 1, "n"), value (field 2: AnyValue { int_value (field 3) = 5 }).
        assert_eq!(kv, [0x0a, 1, b'n', 0x12, 2, 0x18, 5]);
    }
}
