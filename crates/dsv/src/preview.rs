//! Previews of tabular files (CSV / TSV): the first rows and per-column
//! statistics, computed by streaming the file from the store.

use std::io::Read;

use serde::Serialize;

use crate::error::{Error, Result};

/// Statistics of one column.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ColumnStats {
    /// Header name (or `column N`).
    pub name: String,
    /// Non-empty values.
    pub count: u64,
    /// Values that parse as numbers.
    pub numeric: u64,
    /// Smallest numeric value.
    pub min: Option<f64>,
    /// Largest numeric value.
    pub max: Option<f64>,
    /// Mean of the numeric values.
    pub mean: Option<f64>,
}

/// The preview of one file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FilePreview {
    /// Path in the version.
    pub path: String,
    /// Delimiter used.
    pub delimiter: String,
    /// Column names, one per field of a row: the header row, preceded by
    /// `(index)` when every row has one more field than it (an unnamed
    /// leading row-index column).
    pub header: Vec<String>,
    /// The first rows.
    pub rows: Vec<Vec<String>>,
    /// Data rows read.
    pub row_count: u64,
    /// Per-column statistics.
    pub columns: Vec<ColumnStats>,
}

/// The delimiter of a tabular file by its name, or by sniffing its first
/// line for `.txt` / `.dat` files; `None` when it is not tabular.
pub fn tabular_delimiter(path: &str, first_line: &[u8]) -> Option<u8> {
    let lower = path.to_ascii_lowercase();
    if lower.ends_with(".csv") {
        return Some(b',');
    }
    if lower.ends_with(".tsv") || lower.ends_with(".tab") {
        return Some(b'\t');
    }
    if lower.ends_with(".txt") || lower.ends_with(".dat") {
        for d in [b',', b'\t', b';'] {
            if first_line.iter().filter(|&&c| c == d).count() >= 1 {
                return Some(d);
            }
        }
    }
    None
}

/// Reads a tabular file: the first `head` rows and statistics over at most
/// `max_rows` rows.
pub fn preview(
    path: &str,
    delimiter: u8,
    input: impl Read,
    head: usize,
    max_rows: u64,
) -> Result<FilePreview> {
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .has_headers(true)
        .from_reader(input);
    let header: Vec<String> = rdr
        .headers()
        .map_err(|e| Error::Invalid(format!("{path}: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let mut columns: Vec<Acc> = Vec::new();
    let mut rows = Vec::new();
    let mut row_count = 0u64;
    for rec in rdr.records() {
        let rec = rec.map_err(|e| Error::Invalid(format!("{path}: {e}")))?;
        if row_count >= max_rows {
            break;
        }
        row_count += 1;
        if rows.len() < head {
            rows.push(rec.iter().map(str::to_string).collect());
        }
        if columns.len() < rec.len() {
            columns.resize_with(rec.len(), Acc::default);
        }
        for (acc, field) in columns.iter_mut().zip(rec.iter()) {
            acc.push(field);
        }
    }
    let ncols = header.len().max(columns.len());
    columns.resize_with(ncols, Acc::default);
    // One more field per row than header names (as in R's write.csv output,
    // e.g. the occupancy files): the first column is an unnamed row index.
    let mut names = header;
    if ncols == names.len() + 1 {
        names.insert(0, "(index)".to_string());
    }
    while names.len() < ncols {
        names.push(format!("column {}", names.len() + 1));
    }
    let columns = columns
        .into_iter()
        .zip(&names)
        .map(|(a, name)| a.finish(name.clone()))
        .collect();
    Ok(FilePreview {
        path: path.to_string(),
        delimiter: (delimiter as char).to_string(),
        header: names,
        rows,
        row_count,
        columns,
    })
}

#[derive(Default)]
struct Acc {
    count: u64,
    numeric: u64,
    min: f64,
    max: f64,
    sum: f64,
}

impl Acc {
    fn push(&mut self, field: &str) {
        let f = field.trim();
        if f.is_empty() {
            return;
        }
        self.count += 1;
        if let Ok(x) = f.parse::<f64>() {
            if x.is_finite() {
                if self.numeric == 0 {
                    self.min = x;
                    self.max = x;
                } else {
                    self.min = self.min.min(x);
                    self.max = self.max.max(x);
                }
                self.numeric += 1;
                self.sum += x;
            }
        }
    }
    fn finish(self, name: String) -> ColumnStats {
        let has = self.numeric > 0;
        ColumnStats {
            name,
            count: self.count,
            numeric: self.numeric,
            min: has.then_some(self.min),
            max: has.then_some(self.max),
            mean: has.then(|| self.sum / self.numeric as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_a_quoted_csv_with_an_index_column() {
        let data = "\"date\",\"Temperature\",\"Occupancy\"\n\"1\",\"2015-02-04 17:51:00\",23.18,1\n\"2\",\"2015-02-04 17:51:59\",23.15,0\n";
        let p = preview("d.txt", b',', data.as_bytes(), 1, u64::MAX).unwrap();
        // The header lines up with the rows' fields.
        assert_eq!(
            p.header,
            vec!["(index)", "date", "Temperature", "Occupancy"]
        );
        assert_eq!(p.rows[0].len(), p.header.len());
        assert_eq!(p.row_count, 2);
        assert_eq!(p.rows.len(), 1);
        // four fields per row, three header names: a leading row index.
        assert_eq!(p.columns.len(), 4);
        assert_eq!(p.columns[0].name, "(index)");
        assert_eq!(p.columns[2].name, "Temperature");
        assert_eq!(p.columns[2].min, Some(23.15));
        assert_eq!(p.columns[2].max, Some(23.18));
        assert_eq!(p.columns[3].mean, Some(0.5));
        assert_eq!(p.columns[1].numeric, 0);
    }

    #[test]
    fn delimiter_by_name_or_sniffing() {
        assert_eq!(tabular_delimiter("a/b.CSV", b""), Some(b','));
        assert_eq!(tabular_delimiter("b.tsv", b""), Some(b'\t'));
        assert_eq!(tabular_delimiter("b.txt", b"a,b"), Some(b','));
        assert_eq!(tabular_delimiter("b.txt", b"plain words"), None);
        assert_eq!(tabular_delimiter("b.png", b"a,b"), None);
    }
}
