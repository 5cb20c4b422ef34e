//! Users' own data as tables: JSONL (one object per line), CSV / TSV (a header row), and Parquet
//! (what `datasets.Dataset.to_parquet` and pandas write), chosen by the file's extension. A
//! reader returns the wanted columns of every row as [`Cell`]s with the row's position in the
//! file (a line for JSONL and CSV, a row for Parquet), so that every later check can name it. A
//! missing column lists the columns that exist.

use crate::error::InputError;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// One value of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
    /// Anything else (lists, objects), as text for messages.
    Other(String),
}

impl Cell {
    /// The kind of value, for messages.
    pub fn describe(&self) -> String {
        match self {
            Cell::Str(s) => format!("the string {s:?}"),
            Cell::Int(i) => format!("the integer {i}"),
            Cell::Float(f) => format!("the number {f}"),
            Cell::Bool(b) => format!("{b}"),
            Cell::Null => "null".into(),
            Cell::Other(o) => o.clone(),
        }
    }
}

/// A row: where it is in the file (1-based) and the wanted cells, in the order asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub position: usize,
    pub cells: Vec<Cell>,
}

/// The file formats, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
    Tsv,
    Parquet,
}

impl Format {
    pub fn of(path: &Path) -> Result<Format, InputError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        Ok(match name.rsplit('.').next().unwrap_or("") {
            "jsonl" | "json" | "ndjson" => Format::Jsonl,
            "csv" => Format::Csv,
            "tsv" => Format::Tsv,
            "parquet" | "pq" => Format::Parquet,
            _ => {
                return Err(InputError::in_file(
                    path,
                    "unknown file type: expected .jsonl, .csv, .tsv or .parquet (optionally .gz, except Parquet)",
                ))
            }
        })
    }
}

/// Where a problem is: the file and the line or row.
pub fn at(path: &Path, format: Format, position: usize, message: impl Into<String>) -> InputError {
    match format {
        Format::Parquet => InputError::in_file(path, format!("row {position}: {}", message.into())),
        _ => InputError::at_line(path, position, message),
    }
}

/// The `wanted` columns of every row of a table file.
pub fn read(path: &Path, wanted: &[&str]) -> Result<(Format, Vec<Row>), InputError> {
    let format = Format::of(path)?;
    let rows = match format {
        Format::Jsonl => read_jsonl(path, wanted)?,
        Format::Csv => read_csv(path, wanted, b',')?,
        Format::Tsv => read_csv(path, wanted, b'\t')?,
        Format::Parquet => read_parquet(path, wanted)?,
    };
    if rows.is_empty() {
        return Err(InputError::in_file(
            path,
            format!(
                "the file is empty (no rows); expected rows with the columns {}",
                list(wanted)
            ),
        ));
    }
    Ok((format, rows))
}

fn list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn missing(path: &Path, wanted: &str, existing: &[String]) -> InputError {
    InputError::in_file(
        path,
        format!(
            "no column `{wanted}`; the columns are: {} (choose others with the task's *_column settings)",
            existing.join(", ")
        ),
    )
}

fn opened(path: &Path) -> Result<Box<dyn Read>, InputError> {
    let file = std::fs::File::open(path)
        .map_err(|e| InputError::in_file(path, format!("cannot open: {e}")))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    })
}

fn json_cell(value: &serde_json::Value) -> Cell {
    use serde_json::Value;
    match value {
        Value::String(s) => Cell::Str(s.clone()),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Cell::Int(i),
            None => Cell::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::Bool(b) => Cell::Bool(*b),
        Value::Null => Cell::Null,
        other => Cell::Other(other.to_string()),
    }
}

fn read_jsonl(path: &Path, wanted: &[&str]) -> Result<Vec<Row>, InputError> {
    let mut rows = Vec::new();
    for (index, line) in BufReader::new(opened(path)?).lines().enumerate() {
        let n = index + 1;
        let line = line.map_err(|e| InputError::at_line(path, n, format!("cannot read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| InputError::at_line(path, n, format!("not JSON: {e}")))?;
        let object = value.as_object().ok_or_else(|| {
            InputError::at_line(
                path,
                n,
                format!(
                    "expected a JSON object with {}, got {}",
                    list(wanted),
                    json_cell(&value).describe()
                ),
            )
        })?;
        let cells = wanted
            .iter()
            .map(|w| {
                object.get(*w).map(json_cell).ok_or_else(|| {
                    let keys: Vec<String> = object.keys().cloned().collect();
                    InputError::at_line(
                        path,
                        n,
                        format!("no field `{w}`; this line has: {}", keys.join(", ")),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        rows.push(Row { position: n, cells });
    }
    Ok(rows)
}

fn read_csv(path: &Path, wanted: &[&str], delimiter: u8) -> Result<Vec<Row>, InputError> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(opened(path)?);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| InputError::at_line(path, 1, format!("cannot read the header row: {e}")))?
        .iter()
        .map(str::to_string)
        .collect();
    let index: Vec<usize> = wanted
        .iter()
        .map(|w| {
            header
                .iter()
                .position(|h| h == w)
                .ok_or_else(|| missing(path, w, &header))
        })
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line() as usize);
            InputError::at_line(path, line, format!("not a CSV row: {e}"))
        })?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        if record.len() != header.len() {
            return Err(InputError::at_line(
                path,
                line,
                format!("{} fields, the header has {}", record.len(), header.len()),
            ));
        }
        // CSV has only text: integers are recognised where the whole cell is one.
        let cells = index
            .iter()
            .map(|&i| {
                let text = &record[i];
                match text.trim().parse::<i64>() {
                    Ok(v) => Cell::Int(v),
                    Err(_) => Cell::Str(text.to_string()),
                }
            })
            .collect();
        rows.push(Row {
            position: line,
            cells,
        });
    }
    Ok(rows)
}

fn read_parquet(path: &Path, wanted: &[&str]) -> Result<Vec<Row>, InputError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    let file = std::fs::File::open(path)
        .map_err(|e| InputError::in_file(path, format!("cannot open: {e}")))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| InputError::in_file(path, format!("not a readable Parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let root = schema.root_schema();
    let existing: Vec<String> = root
        .get_fields()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    for w in wanted {
        if !existing.iter().any(|e| e == w) {
            return Err(missing(path, w, &existing));
        }
    }
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| InputError::in_file(path, format!("cannot read the rows: {e}")))?;
    let mut rows = Vec::new();
    for (index, row) in iter.enumerate() {
        let n = index + 1;
        let row =
            row.map_err(|e| InputError::in_file(path, format!("row {n}: cannot read: {e}")))?;
        let mut cells = vec![Cell::Null; wanted.len()];
        for (name, field) in row.get_column_iter() {
            if let Some(slot) = wanted.iter().position(|w| w == name) {
                cells[slot] = match field {
                    Field::Str(s) => Cell::Str(s.clone()),
                    Field::Bool(b) => Cell::Bool(*b),
                    Field::Byte(v) => Cell::Int(*v as i64),
                    Field::Short(v) => Cell::Int(*v as i64),
                    Field::Int(v) => Cell::Int(*v as i64),
                    Field::Long(v) => Cell::Int(*v),
                    Field::UByte(v) => Cell::Int(*v as i64),
                    Field::UShort(v) => Cell::Int(*v as i64),
                    Field::UInt(v) => Cell::Int(*v as i64),
                    Field::ULong(v) => Cell::Int(*v as i64),
                    Field::Float(v) => Cell::Float(*v as f64),
                    Field::Double(v) => Cell::Float(*v),
                    Field::Null => Cell::Null,
                    other => Cell::Other(other.to_string()),
                };
            }
        }
        rows.push(Row { position: n, cells });
    }
    Ok(rows)
}
