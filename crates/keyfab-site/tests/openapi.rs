//! The station API answers what docs/openapi.json says: every route is called for its
//! answers — success and each error a station can provoke in-process — and each answer's
//! status must be one the document lists for that route, its body valid against the
//! schema the document gives for it.
//!
//! The validator covers the JSON Schema the document uses (`type`, `required`,
//! `properties`, `additionalProperties: false`, `enum`, `items`, `$ref`); a keyword
//! it does not know fails the test, so the document cannot grow past what is checked.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

mod common;

use keyfab_site::server::api::{app, AppState, OPENAPI};
use serde_json::{json, Value};
use std::sync::Arc;
use tower::ServiceExt;

/// `value` against `schema` (resolving `$ref` in `doc`); the first mismatch, at `at`.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    let Some(keywords) = schema.as_object() else {
        return Err(format!("{at}: schema is not an object: {schema}"));
    };
    for (keyword, rule) in keywords {
        match keyword.as_str() {
            "type" => {
                let allowed: Vec<&str> = match rule {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                    _ => return Err(format!("{at}: bad type {rule}")),
                };
                if !allowed.iter().any(|t| has_type(value, t)) {
                    return Err(format!("{at}: {value} is not of type {rule}"));
                }
            }
            "required" => {
                for name in rule.as_array().into_iter().flatten() {
                    let name = name.as_str().unwrap_or_default();
                    if value.get(name).is_none() {
                        return Err(format!("{at}: missing required `{name}` in {value}"));
                    }
                }
            }
            "properties" => {
                let Some(object) = value.as_object() else {
                    continue;
                };
                for (name, sub) in rule.as_object().into_iter().flatten() {
                    if let Some(v) = object.get(name) {
                        validate(doc, sub, v, &format!("{at}.{name}"))?;
                    }
                }
            }
            "additionalProperties" => {
                assert_eq!(rule, &json!(false), "{at}: only `false` is used");
                let known = schema["properties"].as_object();
                for name in value.as_object().into_iter().flatten().map(|(k, _)| k) {
                    if !known.is_some_and(|k| k.contains_key(name)) {
                        return Err(format!("{at}: `{name}` is not in the schema"));
                    }
                }
            }
            "enum" => {
                if !rule
                    .as_array()
                    .is_some_and(|allowed| allowed.contains(value))
                {
                    return Err(format!("{at}: {value} is not one of {rule}"));
                }
            }
            "items" => {
                for (i, item) in value.as_array().into_iter().flatten().enumerate() {
                    validate(doc, rule, item, &format!("{at}[{i}]"))?;
                }
            }
            // Words for people and for generators: nothing to check in an answer.
            "description" | "format" | "contentEncoding" => {}
            other => return Err(format!("{at}: keyword `{other}` is not checked here")),
        }
    }
    Ok(())
}

fn has_type(value: &Value, t: &str) -> bool {
    match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_u64() || value.is_i64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

/// `node`, or what its `$ref` (`#/a/b/c`) names in `doc`.
fn resolve<'a>(doc: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference.trim_start_matches('#');
            resolve(doc, doc.pointer(pointer).unwrap_or(&Value::Null))
        }
        None => node,
    }
}

/// What the document says `method path` answers with `status`: its media type and
/// schema (none for an answer without a body), or an error if the status is not listed.
fn documented(
    doc: &Value,
    method: &str,
    path: &str,
    status: u16,
) -> Result<Option<(String, Value)>, String> {
    let route = &doc["paths"][path][method.to_lowercase()];
    let answer = route["responses"].get(status.to_string()).ok_or_else(|| {
        format!("{method} {path} answered {status}, which the document does not list")
    })?;
    let answer = resolve(doc, answer);
    Ok(answer["content"].as_object().and_then(|content| {
        content
            .iter()
            .next()
            .map(|(media, body)| (media.clone(), body["schema"].clone()))
    }))
}

struct Api {
    state: AppState,
    doc: Value,
    station: Vec<u8>,
    /// (method, path, status) of every answer checked.
    seen: std::cell::RefCell<Vec<(String, String, u16)>>,
}

impl Api {
    /// Calls `method path` as `cert`'s station, checks the answer against the document
    /// and returns its status and JSON body (`Null` for text).
    async fn call(
        &self,
        method: &str,
        path: &str,
        cert: Option<&[u8]>,
        body: &str,
    ) -> (u16, Value) {
        let req = common::request(method, path, cert, body);
        let resp = app(self.state.clone()).oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let media = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let expected = documented(&self.doc, method, path, status).unwrap();
        let json = match expected {
            Some((doc_media, schema)) => {
                assert!(
                    media.starts_with(&doc_media),
                    "{method} {path} {status}: content-type {media}, documented {doc_media}"
                );
                if doc_media == "application/json" {
                    let value: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                        panic!(
                            "{method} {path} {status}: not JSON ({e}): {}",
                            String::from_utf8_lossy(&bytes)
                        )
                    });
                    validate(&self.doc, &schema, &value, "body")
                        .unwrap_or_else(|e| panic!("{method} {path} {status}: {e}"));
                    value
                } else {
                    Value::Null
                }
            }
            None => Value::Null,
        };
        self.seen
            .borrow_mut()
            .push((method.to_owned(), path.to_owned(), status));
        (status, json)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_matches_the_openapi_document() {
    let mut kit = keyfab_testkit::World::new();
    let station = {
        let node = Arc::get_mut(&mut kit.site).unwrap();
        keyfab_site::stations::line_ca(node).unwrap();
        keyfab_site::stations::enroll(node, "line-1", 30)
            .unwrap()
            .certificate
    };
    let other = keyfab_site::stations::enroll(&kit.site, "line-2", 30)
        .unwrap()
        .certificate;
    let id = kit.entitlement(
        "daily",
        &keyfab_testkit::policy(10, "[limits]\ndaily = 2\n", "site"),
        &[],
    );
    let api = Api {
        state: common::state(kit.site.clone()),
        doc: serde_json::from_str(OPENAPI).unwrap(),
        station,
        seen: Default::default(),
    };
    let me = Some(api.station.as_slice());
    let provision = |request: &str, device: &str, extra: &str| {
        format!(
            r#"{{"request_id":"{request}","entitlement":"{id}","device_id":"{device}"{extra}}}"#
        )
    };
    let chip = keyfab_crypto::hpke::HpkeSecretKey::generate(&keyfab_crypto::rng::SystemRng);
    let transport = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(chip.public_key().unwrap().sec1())
    };

    // Open routes.
    assert_eq!(api.call("GET", "/healthz", None, "").await.0, 200);
    assert_eq!(api.call("GET", "/v1/openapi.json", None, "").await.0, 200);

    // Listing and metrics, and the station check.
    let (status, listed) = api.call("GET", "/v1/entitlements", me, "").await;
    assert_eq!(
        (status, listed["entitlements"][0]["state"].as_str()),
        (200, Some("active"))
    );
    assert_eq!(api.call("GET", "/v1/entitlements", None, "").await.0, 401);
    assert_eq!(api.call("GET", "/metrics", me, "").await.0, 200);
    assert_eq!(
        api.call("GET", "/metrics", Some(b"not a certificate"), "")
            .await
            .0,
        403
    );
    assert_eq!(api.call("POST", "/v1/confirm", None, "{}").await.0, 401);

    // Provisioning: keys, keys sealed to a chip, a replay, and each refusal.
    assert_eq!(
        api.call("POST", "/v1/provision", me, &provision("r-1", "D-1", ""))
            .await
            .0,
        200
    );
    let (status, again) = api
        .call("POST", "/v1/provision", me, &provision("r-1", "D-1", ""))
        .await;
    assert_eq!((status, again["replayed"].as_bool()), (200, Some(true)));
    let sealed = format!(r#","transport_key":"{transport}""#);
    let (status, chip_bundle) = api
        .call(
            "POST",
            "/v1/provision",
            me,
            &provision("r-2", "D-2", &sealed),
        )
        .await;
    assert_eq!(status, 200);
    assert!(chip_bundle["chip_enc_base64"].is_string(), "{chip_bundle}");
    for (body, status, code) in [
        (provision("r-3", "D-3", ""), 403, "daily_limit_exceeded"),
        (
            provision("r-4", "D-1", ""),
            403,
            "device_already_provisioned",
        ),
        (provision("r-5", "D 5", ""), 400, "invalid_input"),
        (provision("lot:1", "D-6", ""), 400, "invalid_input"),
        (provision("r-6", "D-6", r#","extra":1"#), 400, "malformed"),
        (
            provision("r-6", "D-6", r#","chip_certificates":[]"#),
            400,
            "malformed",
        ),
        (
            provision("r-6", "D-6", r#","chip_certificates":["!!"]"#),
            400,
            "malformed",
        ),
        ("not json".into(), 400, "malformed"),
        (
            r#"{"request_id":"r-7","entitlement":"nope","device_id":"D-7"}"#.into(),
            404,
            "unknown_entitlement",
        ),
        (
            "x".repeat(keyfab_site::server::api::MAX_BODY_BYTES + 1),
            413,
            "invalid_input",
        ),
    ] {
        let (got, answer) = api.call("POST", "/v1/provision", me, &body).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{answer}"
        );
    }
    let stranger = Some(other.as_slice());
    let (status, answer) = api
        .call(
            "POST",
            "/v1/provision",
            stranger,
            &provision("r-1", "D-1", ""),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (403, Some("station_not_allowed"))
    );

    // Confirmations: recorded, repeated, contradicted, and refused.
    let confirm = |device: &str, result: &str| {
        format!(r#"{{"entitlement":"{id}","device_id":"{device}","result":"{result}"}}"#)
    };
    assert_eq!(
        api.call("POST", "/v1/confirm", me, &confirm("D-1", "programmed"))
            .await
            .0,
        200
    );
    let (status, repeated) = api
        .call("POST", "/v1/confirm", me, &confirm("D-1", "programmed"))
        .await;
    assert_eq!((status, repeated["repeated"].as_bool()), (200, Some(true)));
    for (body, station, status, code) in [
        (confirm("D-1", "failed"), me, 409, "invalid_state"),
        (
            confirm("D-2", "programmed"),
            stranger,
            403,
            "station_not_allowed",
        ),
        (confirm("D-2", "maybe"), me, 400, "malformed"),
        (confirm("D-9", "programmed"), me, 404, "not_found"),
        (
            r#"{"entitlement":"nope","device_id":"D-1","result":"failed"}"#.into(),
            me,
            404,
            "unknown_entitlement",
        ),
        (
            "x".repeat(keyfab_site::server::api::MAX_BODY_BYTES + 1),
            me,
            413,
            "invalid_input",
        ),
    ] {
        let (got, answer) = api.call("POST", "/v1/confirm", station, &body).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }

    // A revoked station: refused on every station route.
    keyfab_site::stations::revoke(&api.state.node, "line-2").unwrap();
    api.state
        .revocations
        .fetch_add(1, std::sync::atomic::Ordering::Release);
    for (method, path) in [
        ("GET", "/v1/entitlements"),
        ("GET", "/metrics"),
        ("POST", "/v1/confirm"),
    ] {
        let (status, answer) = api.call(method, path, stranger, "{}").await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (403, Some("untrusted_signer")),
            "{path}"
        );
    }

    // Every route of the document was called, and answered at least once with success.
    let seen = api.seen.borrow();
    for (path, ops) in api.doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let m = method.to_uppercase();
            assert!(
                seen.iter()
                    .any(|(sm, sp, status)| *sm == m && sp == path && *status == 200),
                "{m} {path} never answered 200 here"
            );
        }
    }
}

/// The document's entitlement states are the ones the site reports.
#[test]
fn the_documented_states_are_the_sites() {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    let documented = &doc["components"]["schemas"]["EntitlementState"]["enum"];
    let reported: Vec<Value> = keyfab_policy::EntitlementStatus::ALL
        .iter()
        .map(|s| json!(s.as_str()))
        .collect();
    let mut documented: Vec<Value> = documented.as_array().unwrap().clone();
    let mut reported = reported;
    let key = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    documented.sort_by_key(key);
    reported.sort_by_key(key);
    assert_eq!(documented, reported);
}
