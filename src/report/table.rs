//! Markdown tables, built a row at a time: the one table builder of every report.

/// A Markdown table: a header and rows of cells. A cell renders as `| text |`; cells left out
/// at the end of a short row as `| |`.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

impl Table {
    pub fn new<S: AsRef<str>>(header: &[S]) -> Table {
        Table {
            header: header.iter().map(|h| h.as_ref().to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (fewer cells than columns are padded with empty ones).
    pub fn row(&mut self, cells: impl IntoIterator<Item = String>) -> &mut Table {
        let mut cells: Vec<Option<String>> = cells.into_iter().map(Some).collect();
        if cells.len() < self.header.len() {
            cells.resize(self.header.len(), None);
        }
        self.rows.push(cells);
        self
    }

    /// The header line, the separator and one line per row, each ending with a newline.
    pub fn render(&self) -> String {
        let line = |cells: &mut dyn Iterator<Item = Option<&String>>| {
            let mut out = String::from("|");
            for cell in cells {
                match cell {
                    Some(text) => out.push_str(&format!(" {text} |")),
                    None => out.push_str(" |"),
                }
            }
            out.push('\n');
            out
        };
        let mut out = line(&mut self.header.iter().map(Some));
        out.push('|');
        out.push_str(&"---|".repeat(self.header.len()));
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(&mut row.iter().map(Option::as_ref)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_header_separator_and_padded_rows() {
        let mut t = Table::new(&["model", "accuracy", "C"]);
        t.row(["weak: a".to_string(), "0.5".into(), "1e-2".into()]);
        t.row(["ceiling".to_string(), "0.9".into()]);
        t.row(["student".to_string(), String::new(), "1".into()]);
        assert_eq!(
            t.render(),
            "| model | accuracy | C |\n|---|---|---|\n| weak: a | 0.5 | 1e-2 |\n| ceiling | 0.9 | |\n\
             | student |  | 1 |\n"
        );
        assert_eq!(Table::new(&["x"]).render(), "| x |\n|---|\n");
    }
}
