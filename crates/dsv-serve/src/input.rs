//! Request bodies: JSON rows (one object, an array of objects, or
//! `{"rows": [...]}`) or CSV with a header line, into named numeric
//! columns. Every fault names the row and column.

use crate::error::ApiError;

/// Parsed rows: column names in the order of the first row, values row by
/// row; the sticky key of the request, when its field was sent.
#[derive(Debug, Default)]
pub struct Rows {
    /// Column names.
    pub columns: Vec<String>,
    /// Row-major values (`rows × columns`).
    pub values: Vec<f64>,
    /// Rows.
    pub rows: usize,
    /// The value of the sticky-key field of the first row, if any.
    pub key: Option<String>,
}

impl Rows {
    /// The rows as a row-major matrix of `features`, in that order.
    /// A column outside `known` is refused (named), so is a missing feature.
    pub fn matrix(&self, features: &[String]) -> Result<Vec<f64>, ApiError> {
        let mut idx = Vec::with_capacity(features.len());
        for f in features {
            match self.columns.iter().position(|c| c == f) {
                Some(i) => idx.push(i),
                None => {
                    return Err(ApiError::MissingColumn {
                        row: 1,
                        column: f.clone(),
                    })
                }
            }
        }
        let w = self.columns.len();
        let mut out = Vec::with_capacity(self.rows * features.len());
        for r in 0..self.rows {
            for &i in &idx {
                out.push(self.values[r * w + i]);
            }
        }
        Ok(out)
    }

    /// Refuses a column no model of the line reads.
    pub fn check_known(&self, known: &[String]) -> Result<(), ApiError> {
        for c in &self.columns {
            if !known.iter().any(|k| k == c) {
                return Err(ApiError::UnknownColumn {
                    column: c.clone(),
                    expected: known.join(", "),
                });
            }
        }
        Ok(())
    }
}

fn number(v: &serde_json::Value, row: usize, column: &str) -> Result<f64, ApiError> {
    match v.as_f64() {
        Some(x) if x.is_finite() => Ok(x),
        _ => Err(ApiError::WrongType {
            row,
            column: column.to_string(),
            found: match v {
                serde_json::Value::String(s) => format!("the string {s:?}"),
                serde_json::Value::Null => "null".into(),
                serde_json::Value::Bool(b) => format!("{b}"),
                serde_json::Value::Array(_) => "an array".into(),
                serde_json::Value::Object(_) => "an object".into(),
                serde_json::Value::Number(n) => n.to_string(),
            },
        }),
    }
}

fn key_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Parses a JSON body. `key_field`, when set, is taken out of every row
/// (the first row's value is the request's sticky key).
pub fn json(body: &[u8], key_field: Option<&str>) -> Result<Rows, ApiError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::Malformed(format!("the body is not valid JSON: {e}")))?;
    let rows: Vec<&serde_json::Map<String, serde_json::Value>> = match &v {
        serde_json::Value::Object(o) => match o.get("rows") {
            Some(serde_json::Value::Array(a)) => as_objects(a)?,
            Some(_) => {
                return Err(ApiError::Malformed(
                    "\"rows\" must be an array of objects".into(),
                ))
            }
            None => vec![o],
        },
        serde_json::Value::Array(a) => as_objects(a)?,
        _ => return Err(ApiError::Malformed(
            "the body must be a JSON object (one row), an array of objects, or {\"rows\": [...]}"
                .into(),
        )),
    };
    if rows.is_empty() {
        return Err(ApiError::Malformed("no rows".into()));
    }
    let mut out = Rows::default();
    for (k, v) in rows[0] {
        if Some(k.as_str()) == key_field {
            out.key = Some(key_text(v));
            continue;
        }
        out.columns.push(k.clone());
    }
    out.values.reserve(rows.len() * out.columns.len());
    for (r, obj) in rows.iter().enumerate() {
        let row = r + 1;
        let mut seen = 0;
        for c in &out.columns {
            match obj.get(c) {
                Some(v) => {
                    out.values.push(number(v, row, c)?);
                    seen += 1;
                }
                None => {
                    return Err(ApiError::MissingColumn {
                        row,
                        column: c.clone(),
                    })
                }
            }
        }
        let extra = obj.len() - seen - usize::from(key_field.is_some_and(|k| obj.contains_key(k)));
        if extra > 0 {
            let column = obj
                .keys()
                .find(|k| Some(k.as_str()) != key_field && !out.columns.contains(k))
                .cloned()
                .unwrap_or_default();
            return Err(ApiError::Malformed(format!(
                "row {row} has column '{column}', which row 1 does not have"
            )));
        }
    }
    out.rows = rows.len();
    Ok(out)
}

fn as_objects(
    a: &[serde_json::Value],
) -> Result<Vec<&serde_json::Map<String, serde_json::Value>>, ApiError> {
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_object()
                .ok_or_else(|| ApiError::Malformed(format!("row {} is not a JSON object", i + 1)))
        })
        .collect()
}

/// Parses a CSV body (a header line, then rows; `,` or `;` or tab).
pub fn csv(body: &[u8], key_field: Option<&str>) -> Result<Rows, ApiError> {
    let first = body.split(|b| *b == b'\n').next().unwrap_or_default();
    let delim = [b',', b';', b'\t']
        .into_iter()
        .max_by_key(|d| first.iter().filter(|b| *b == d).count())
        .unwrap_or(b',');
    let mut rd = csv::ReaderBuilder::new()
        .delimiter(delim)
        .trim(csv::Trim::All)
        .from_reader(body);
    let header = rd
        .headers()
        .map_err(|e| ApiError::Malformed(format!("the CSV header does not parse: {e}")))?
        .clone();
    let mut out = Rows::default();
    let mut keep = Vec::new();
    let mut key_at = None;
    for (i, h) in header.iter().enumerate() {
        if Some(h) == key_field {
            key_at = Some(i);
        } else {
            out.columns.push(h.to_string());
            keep.push(i);
        }
    }
    for (r, rec) in rd.records().enumerate() {
        let row = r + 1;
        let rec = rec.map_err(|e| ApiError::Malformed(format!("CSV row {row}: {e}")))?;
        if rec.len() != header.len() {
            return Err(ApiError::Malformed(format!(
                "CSV row {row} has {} fields, the header {}",
                rec.len(),
                header.len()
            )));
        }
        if r == 0 {
            out.key = key_at.map(|i| rec[i].to_string());
        }
        for (&i, c) in keep.iter().zip(&out.columns) {
            let t = &rec[i];
            match t.parse::<f64>() {
                Ok(x) if x.is_finite() => out.values.push(x),
                _ => {
                    return Err(ApiError::WrongType {
                        row,
                        column: c.clone(),
                        found: format!("{t:?}"),
                    })
                }
            }
        }
        out.rows += 1;
    }
    if out.rows == 0 {
        return Err(ApiError::Malformed("no rows after the CSV header".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shapes_agree_and_faults_name_row_and_column() {
        let one = json(br#"{"a": 1, "b": 2.5, "user": "u1"}"#, Some("user")).unwrap();
        assert_eq!(one.columns, ["a", "b"]);
        assert_eq!(one.values, [1.0, 2.5]);
        assert_eq!(one.key.as_deref(), Some("u1"));
        let many = json(br#"{"rows": [{"a": 1, "b": 2}, {"b": 4, "a": 3}]}"#, None).unwrap();
        assert_eq!(many.rows, 2);
        assert_eq!(
            many.matrix(&["b".into(), "a".into()]).unwrap(),
            [2.0, 1.0, 4.0, 3.0]
        );
        let arr = json(br#"[{"a": 1}, {"a": 2}]"#, None).unwrap();
        assert_eq!(arr.values, [1.0, 2.0]);
        match json(br#"[{"a": 1}, {"a": "x"}]"#, None).unwrap_err() {
            ApiError::WrongType { row, column, .. } => assert_eq!((row, column.as_str()), (2, "a")),
            e => panic!("{e:?}"),
        }
        match json(br#"[{"a": 1}, {"b": 1}]"#, None).unwrap_err() {
            ApiError::MissingColumn { row, column } => assert_eq!((row, column.as_str()), (2, "a")),
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            json(b"{not json", None),
            Err(ApiError::Malformed(_))
        ));
        assert!(matches!(json(b"[]", None), Err(ApiError::Malformed(_))));
        assert!(matches!(json(b"[1]", None), Err(ApiError::Malformed(_))));
        let e = one.check_known(&["a".into()]).unwrap_err();
        assert!(e.to_string().contains("'b'"), "{e}");
        let e = one.matrix(&["a".into(), "c".into()]).unwrap_err();
        assert!(e.to_string().contains("'c'"), "{e}");
    }

    #[test]
    fn csv_reads_a_header_and_numbers() {
        let r = csv(b"user,a,b\nu9,1,2\nu9,3,4\n", Some("user")).unwrap();
        assert_eq!(
            (r.rows, r.columns.clone()),
            (2, vec!["a".to_string(), "b".into()])
        );
        assert_eq!(r.values, [1.0, 2.0, 3.0, 4.0]);
        assert_eq!(r.key.as_deref(), Some("u9"));
        match csv(b"a;b\n1;x\n", None).unwrap_err() {
            ApiError::WrongType { row, column, .. } => assert_eq!((row, column.as_str()), (1, "b")),
            e => panic!("{e:?}"),
        }
        assert!(matches!(csv(b"a,b\n", None), Err(ApiError::Malformed(_))));
        assert!(matches!(
            csv(b"a,b\n1\n", None),
            Err(ApiError::Malformed(_))
        ));
    }
}
