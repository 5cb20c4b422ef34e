//! Flat Parquet tables (one column per field, no nesting, uncompressed) that pandas, pyarrow and
//! HF datasets read directly.

use anyhow::{bail, Context, Result};
use parquet::basic::{ConvertedType, Repetition, Type as PhysicalType};
use parquet::column::writer::ColumnWriter;
use parquet::data_type::ByteArray;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;
use std::path::Path;
use std::sync::Arc;

/// The values of one column.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnData {
    Int64(Vec<i64>),
    Double(Vec<f64>),
    Utf8(Vec<String>),
    /// Nullable.
    OptionalDouble(Vec<Option<f64>>),
    /// Nullable.
    OptionalInt64(Vec<Option<i64>>),
}

impl ColumnData {
    fn len(&self) -> usize {
        match self {
            ColumnData::Int64(v) => v.len(),
            ColumnData::Double(v) => v.len(),
            ColumnData::Utf8(v) => v.len(),
            ColumnData::OptionalDouble(v) => v.len(),
            ColumnData::OptionalInt64(v) => v.len(),
        }
    }

    fn schema(&self, name: &str) -> Result<Type> {
        let (physical, repetition, utf8) = match self {
            ColumnData::Int64(_) => (PhysicalType::INT64, Repetition::REQUIRED, false),
            ColumnData::Double(_) => (PhysicalType::DOUBLE, Repetition::REQUIRED, false),
            ColumnData::Utf8(_) => (PhysicalType::BYTE_ARRAY, Repetition::REQUIRED, true),
            ColumnData::OptionalDouble(_) => (PhysicalType::DOUBLE, Repetition::OPTIONAL, false),
            ColumnData::OptionalInt64(_) => (PhysicalType::INT64, Repetition::OPTIONAL, false),
        };
        let mut builder = Type::primitive_type_builder(name, physical).with_repetition(repetition);
        if utf8 {
            builder = builder.with_converted_type(ConvertedType::UTF8);
        }
        Ok(builder.build()?)
    }
}

fn optional<T: Clone + Default>(values: &[Option<T>]) -> (Vec<T>, Vec<i16>) {
    let present: Vec<T> = values.iter().flatten().cloned().collect();
    let levels = values.iter().map(|v| i16::from(v.is_some())).collect();
    (present, levels)
}

/// Writes the columns as one row group, atomically (temporary file, then rename).
pub fn write(path: &Path, columns: &[(String, ColumnData)]) -> Result<()> {
    let rows = columns.first().map_or(0, |(_, c)| c.len());
    if let Some((name, _)) = columns.iter().find(|(_, c)| c.len() != rows) {
        bail!("column `{name}` does not have {rows} rows");
    }
    let fields: Vec<Arc<Type>> = columns
        .iter()
        .map(|(n, c)| c.schema(n).map(Arc::new))
        .collect::<Result<_>>()?;
    let schema = Arc::new(
        Type::group_type_builder("schema")
            .with_fields(fields)
            .build()?,
    );
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut writer =
        SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build()))?;
    let mut group = writer.next_row_group()?;
    let mut index = 0;
    while let Some(mut column) = group.next_column()? {
        match (&columns[index].1, column.untyped()) {
            (ColumnData::Int64(v), ColumnWriter::Int64ColumnWriter(w)) => {
                w.write_batch(v, None, None)?;
            }
            (ColumnData::Double(v), ColumnWriter::DoubleColumnWriter(w)) => {
                w.write_batch(v, None, None)?;
            }
            (ColumnData::Utf8(v), ColumnWriter::ByteArrayColumnWriter(w)) => {
                let bytes: Vec<ByteArray> = v.iter().map(|s| ByteArray::from(s.as_str())).collect();
                w.write_batch(&bytes, None, None)?;
            }
            (ColumnData::OptionalDouble(v), ColumnWriter::DoubleColumnWriter(w)) => {
                let (values, levels) = optional(v);
                w.write_batch(&values, Some(&levels), None)?;
            }
            (ColumnData::OptionalInt64(v), ColumnWriter::Int64ColumnWriter(w)) => {
                let (values, levels) = optional(v);
                w.write_batch(&values, Some(&levels), None)?;
            }
            _ => bail!(
                "internal error: column `{}` does not match its writer",
                columns[index].0
            ),
        }
        column.close()?;
        index += 1;
    }
    group.close()?;
    writer.close()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A named column.
pub(crate) fn named(name: impl Into<String>, data: ColumnData) -> (String, ColumnData) {
    (name.into(), data)
}

/// A text column from typed rows.
pub(crate) fn text_column<R>(rows: &[R], value: impl Fn(&R) -> &str) -> ColumnData {
    ColumnData::Utf8(rows.iter().map(|r| value(r).to_string()).collect())
}

/// The seed column.
pub(crate) fn seed_column<R>(rows: &[R], seed: impl Fn(&R) -> u64) -> ColumnData {
    ColumnData::Int64(rows.iter().map(|r| seed(r) as i64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    #[test]
    fn round_trip_through_the_parquet_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let columns = vec![
            (
                "id".to_string(),
                ColumnData::Utf8(vec!["a".into(), "é".into()]),
            ),
            (
                "label".to_string(),
                ColumnData::OptionalInt64(vec![Some(1), None]),
            ),
            ("p0".to_string(), ColumnData::Double(vec![0.25, 0.5])),
            (
                "conf".to_string(),
                ColumnData::OptionalDouble(vec![None, Some(0.9)]),
            ),
            ("seed".to_string(), ColumnData::Int64(vec![0, 0])),
        ];
        write(&path, &columns).unwrap();
        let reader = SerializedFileReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(reader.metadata().file_metadata().num_rows(), 2);
        let rows: Vec<String> = reader
            .get_row_iter(None)
            .unwrap()
            .map(|r| r.unwrap().to_string())
            .collect();
        assert_eq!(
            rows[0],
            "{id: \"a\", label: 1, p0: 0.25, conf: null, seed: 0}"
        );
        assert_eq!(
            rows[1],
            "{id: \"é\", label: null, p0: 0.5, conf: 0.9, seed: 0}"
        );
        let bad = vec![
            ("a".to_string(), ColumnData::Int64(vec![1])),
            ("b".to_string(), ColumnData::Int64(vec![])),
        ];
        assert!(write(&dir.path().join("bad.parquet"), &bad).is_err());
    }
}
