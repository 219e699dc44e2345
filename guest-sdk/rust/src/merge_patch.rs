//! JSON Merge Patch ([RFC 7396]): apply, exact composition, and delta.
//!
//! Merge patches are not closed under composition: `{"k":5}` then `{"k":{"a":1}}` leaves
//! `k` exactly `{"a":1}`, but no single merge patch says "replace `k` with `{"a":1}`"
//! (applied to `{"k":{"b":2}}`, the patch `{"k":{"a":1}}` gives `{"a":1,"b":2}`).
//! [`compose`] therefore composes where the result is exact and says where it is not.
//!
//! A document built only by applying merge patches never holds `null` as an object member
//! (a `null` in a patch deletes). [`delta`] relies on that: it can express any difference
//! between two such documents, and refuses documents with `null` members.
//!
//! [RFC 7396]: https://www.rfc-editor.org/rfc/rfc7396

use serde_json::{Map, Value};

/// Apply `patch` to `target` in place (RFC 7396 section 2).
pub fn apply(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(map) = target else { unreachable!("made an object above") };
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            apply(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// One patch equivalent to `first` then `second`, for every document, or the JSON path
/// where no single merge patch can say it.
pub fn compose(first: &Value, second: &Value) -> Result<Value, String> {
    compose_at(first, second, &mut String::new())
}

fn compose_at(first: &Value, second: &Value, path: &mut String) -> Result<Value, String> {
    let Value::Object(second) = second else {
        // A non-object patch replaces the whole value, whatever came before.
        return Ok(second.clone());
    };
    let Value::Object(first) = first else {
        return Err(not_composable(path));
    };
    let mut out = first.clone();
    for (key, b) in second {
        let composed = match (out.get(key), b) {
            (Some(a), Value::Object(_)) if a.is_object() => {
                let len = path.len();
                path.push('/');
                path.push_str(key);
                let composed = compose_at(a, b, path)?;
                path.truncate(len);
                composed
            }
            // `first` set this member to a non-object (or deleted it); merging an object
            // into it must replace it with exactly that object, which a patch cannot say.
            (Some(_), Value::Object(_)) => {
                return Err(not_composable(&format!("{path}/{key}")));
            }
            _ => b.clone(),
        };
        out.insert(key.clone(), composed);
    }
    Ok(Value::Object(out))
}

fn not_composable(path: &str) -> String {
    let path = if path.is_empty() { "/" } else { path };
    format!(
        "not composable at {path}: an object patch over a value the earlier patch replaced or \
         deleted must replace it exactly, which a merge patch cannot express"
    )
}

/// The patch that takes `from` to `to`: `apply(from, delta(from, to)) == to`.
/// Fails only if `to` holds `null` as an object member, which no merge patch can create.
pub fn delta(from: &Value, to: &Value) -> Result<Value, String> {
    let Value::Object(to_map) = to else {
        return Ok(to.clone());
    };
    let Value::Object(from_map) = from else {
        check_no_null_members(to, &mut String::new())?;
        return Ok(to.clone());
    };
    let mut out = Map::new();
    for key in from_map.keys() {
        if !to_map.contains_key(key) {
            out.insert(key.clone(), Value::Null);
        }
    }
    for (key, b) in to_map {
        match from_map.get(key) {
            Some(a) if a == b => {}
            Some(a) if a.is_object() && b.is_object() => {
                out.insert(key.clone(), delta(a, b)?);
            }
            _ => {
                check_no_null_members(b, &mut format!("/{key}"))?;
                if b.is_null() {
                    return Err(format!("cannot express a null member at /{key} as a merge patch"));
                }
                out.insert(key.clone(), b.clone());
            }
        }
    }
    Ok(Value::Object(out))
}

fn check_no_null_members(value: &Value, path: &mut String) -> Result<(), String> {
    if let Value::Object(map) = value {
        for (key, v) in map {
            let len = path.len();
            path.push('/');
            path.push_str(key);
            if v.is_null() {
                return Err(format!("cannot express a null member at {path} as a merge patch"));
            }
            check_no_null_members(v, path)?;
            path.truncate(len);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn applied(mut doc: Value, patch: &Value) -> Value {
        apply(&mut doc, patch);
        doc
    }

    #[test]
    fn rfc_7396_appendix_a() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (json!({"a":"b","b":"c"}), json!({"a":null}), json!({"b":"c"})),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (json!({"a":{"b":"c"}}), json!({"a":{"b":"d","c":null}}), json!({"a":{"b":"d"}})),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (json!({}), json!({"a":{"bb":{"ccc":null}}}), json!({"a":{"bb":{}}})),
        ];
        for (doc, patch, want) in cases {
            assert_eq!(applied(doc.clone(), &patch), want, "{doc} + {patch}");
        }
    }

    #[test]
    fn the_issue_example_does_not_compose() {
        let err = compose(&json!({"k":5}), &json!({"k":{"a":1}})).unwrap_err();
        assert!(err.contains("/k"), "{err}");
        let base = json!({"k":{"b":2}});
        let sequential = applied(applied(base.clone(), &json!({"k":5})), &json!({"k":{"a":1}}));
        assert_eq!(sequential, json!({"k":{"a":1}}));
    }
}
