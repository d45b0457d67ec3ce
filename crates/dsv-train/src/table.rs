//! Numeric tables from real-world CSV: quoted fields, an unnamed leading
//! row-index column (a header with one name fewer than the rows have
//! fields), quoted or unquoted dates, several files with one header.

use std::io::Read;

use crate::error::{Error, Result};

/// Feature columns and a label column read from one or more CSV files.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Feature names, in order.
    pub features: Vec<String>,
    /// Row-major feature values.
    pub x: Vec<f64>,
    /// Labels (when a label column was asked for).
    pub y: Vec<f64>,
    /// Rows.
    pub rows: usize,
}

/// Which columns to read.
#[derive(Debug, Clone)]
pub struct Columns<'a> {
    /// Feature column names; empty means every numeric column but the label.
    pub features: &'a [String],
    /// Label column; `None` when predicting.
    pub label: Option<&'a str>,
}

fn delimiter_for(name: &str) -> u8 {
    if name.ends_with(".tsv") || name.ends_with(".tab") {
        b'\t'
    } else {
        b','
    }
}

impl Table {
    /// Appends the rows of one CSV file. `name` is used in error messages.
    pub fn read(&mut self, name: &str, input: impl Read, cols: &Columns<'_>) -> Result<()> {
        let mut rdr = csv::ReaderBuilder::new()
            .delimiter(delimiter_for(name))
            .flexible(true)
            .has_headers(true)
            .from_reader(input);
        let header: Vec<String> = rdr
            .headers()
            .map_err(|e| Error::Data(format!("{name}: cannot read the header: {e}")))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        if header.is_empty() || header.iter().all(|h| h.is_empty()) {
            return Err(Error::Data(format!("{name}: no header row")));
        }
        let find = |col: &str| -> Result<usize> {
            header.iter().position(|h| h == col).ok_or_else(|| {
                Error::Data(format!(
                    "{name}: no column '{col}' (columns: {})",
                    header.join(", ")
                ))
            })
        };
        let features: Vec<String> = if cols.features.is_empty() {
            // Every column but the label and obvious non-features (dates, ids).
            header
                .iter()
                .filter(|h| {
                    !h.is_empty()
                        && Some(h.as_str()) != cols.label
                        && !["date", "time", "timestamp", "id"]
                            .contains(&h.to_ascii_lowercase().as_str())
                })
                .cloned()
                .collect()
        } else {
            cols.features.to_vec()
        };
        if self.rows == 0 && self.features.is_empty() {
            self.features = features.clone();
        } else if self.features != features {
            return Err(Error::Data(format!(
                "{name}: features {:?} differ from the other files' {:?}",
                features, self.features
            )));
        }
        let fidx: Vec<usize> = features.iter().map(|f| find(f)).collect::<Result<_>>()?;
        let lidx = cols.label.map(find).transpose()?;
        let mut rec = csv::StringRecord::new();
        let mut line = 1u64;
        loop {
            match rdr.read_record(&mut rec) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => return Err(Error::Data(format!("{name}: {e}"))),
            }
            line += 1;
            if rec.iter().all(|f| f.trim().is_empty()) {
                continue;
            }
            // One more field than names: an unnamed leading row index.
            let shift = match rec.len() {
                n if n == header.len() => 0,
                n if n == header.len() + 1 => 1,
                n => {
                    return Err(Error::Data(format!(
                        "{name}, row {line}: {n} fields, the header names {}",
                        header.len()
                    )))
                }
            };
            let cell = |i: usize, col: &str| -> Result<f64> {
                let raw = rec.get(i + shift).unwrap_or("").trim();
                raw.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite())
                    .ok_or_else(|| {
                        Error::Data(format!(
                            "{name}, row {line}, column '{col}': '{raw}' is not a number"
                        ))
                    })
            };
            for (i, f) in fidx.iter().zip(&features) {
                self.x.push(cell(*i, f)?);
            }
            if let (Some(i), Some(l)) = (lidx, cols.label) {
                self.y.push(cell(i, l)?);
            }
            self.rows += 1;
        }
        Ok(())
    }

    /// The feature matrix.
    pub fn matrix(&self) -> ndarray::Array2<f64> {
        ndarray::Array2::from_shape_vec((self.rows, self.features.len()), self.x.clone())
            .expect("rows × features values")
    }

    /// Rows picked by index.
    pub fn select(&self, idx: &[usize]) -> Table {
        let n = self.features.len();
        let mut t = Table {
            features: self.features.clone(),
            ..Default::default()
        };
        for &i in idx {
            t.x.extend_from_slice(&self.x[i * n..(i + 1) * n]);
            if !self.y.is_empty() {
                t.y.push(self.y[i]);
            }
            t.rows += 1;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols<'a>(f: &'a [String], l: Option<&'a str>) -> Columns<'a> {
        Columns {
            features: f,
            label: l,
        }
    }

    #[test]
    fn reads_the_occupancy_layout() {
        let text = "\"date\",\"Temperature\",\"Light\",\"Occupancy\"\n\
                    \"1\",\"2015-02-04 17:51:00\",23.18,426,1\n\
                    \"2\",2015-02-04 17:52:00,23.15,429.5,0\n";
        let mut t = Table::default();
        let f = vec!["Temperature".to_string(), "Light".to_string()];
        t.read("a.txt", text.as_bytes(), &cols(&f, Some("Occupancy")))
            .unwrap();
        assert_eq!(t.rows, 2);
        assert_eq!(t.x, vec![23.18, 426.0, 23.15, 429.5]);
        assert_eq!(t.y, vec![1.0, 0.0]);
        // Default features skip the date and the label.
        let mut t = Table::default();
        t.read("a.txt", text.as_bytes(), &cols(&[], Some("Occupancy")))
            .unwrap();
        assert_eq!(t.features, vec!["Temperature", "Light"]);
    }

    #[test]
    fn errors_name_file_row_and_column() {
        let text = "a,b,y\n1,2,0\n3,x,1\n";
        let f = vec!["a".to_string(), "b".to_string()];
        let e = Table::default()
            .read("d.csv", text.as_bytes(), &cols(&f, Some("y")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("d.csv") && e.contains("row 3") && e.contains("'b'") && e.contains("'x'"),
            "{e}"
        );
        let f = vec!["nope".to_string()];
        let e = Table::default()
            .read("d.csv", text.as_bytes(), &cols(&f, Some("y")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no column 'nope'") && e.contains("a, b, y"),
            "{e}"
        );
    }
}
