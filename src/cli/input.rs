//! Reading prediction inputs `[N, d_in]` from CSV or `.npy` files.
//!
//! CSV: comma-separated numbers, one input per line; blank lines are skipped. The first
//! line is a header when none of its cells is a number. Every other line must have the
//! same number of cells, each a finite number.
//!
//! `.npy`: NumPy's format (versions 1–3), dtype `f4` or `f8` (either byte order),
//! 2-D `[N, d_in]`, C order (Fortran order is transposed on reading).
//!
//! Every error names the file and, where there is one, the line or row and the column.
use std::path::Path;

use ndarray::Array2;

use crate::{Error, Result};

/// Read inputs from `path` (`.npy` by extension, CSV otherwise) and check their width.
pub fn read_inputs(path: &Path, d_in: usize) -> Result<Array2<f32>> {
    let is_npy = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, &e))?;
    let name = path.display();
    let x = if is_npy { parse_npy(&bytes) } else { parse_csv(&bytes, d_in) }
        .map_err(|msg| Error::invalid(format!("{name}: {msg}")))?;
    if x.ncols() != d_in {
        return Err(Error::invalid(format!(
            "{name}: inputs have {} columns, the model takes {d_in} features",
            x.ncols()
        )));
    }
    Ok(x)
}

/// Parse CSV text into `[N, d_in]`; errors are messages without the file name.
pub fn parse_csv(bytes: &[u8], d_in: usize) -> std::result::Result<Array2<f32>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l)).filter(|(_, l)| !l.trim().is_empty()).peekable();
    let cells = |line: &str| -> Vec<String> {
        line.split(',').map(|c| c.trim().trim_matches('"').trim().to_string()).collect()
    };
    let mut header_width = None;
    if let Some((line_no, first)) = lines.peek() {
        let first = cells(first);
        if first.iter().all(|c| c.parse::<f64>().is_err()) {
            if first.len() != d_in {
                return Err(format!(
                    "line {line_no}: the header has {} columns, the model takes {d_in} features",
                    first.len()
                ));
            }
            header_width = Some(first.len());
            lines.next();
        }
    }
    let mut values = Vec::new();
    let mut rows = 0usize;
    let mut width = header_width;
    for (line_no, line) in lines {
        let row = cells(line);
        match width {
            None if row.len() != d_in => {
                return Err(format!("line {line_no}: {} columns, the model takes {d_in} features", row.len()));
            }
            Some(w) if row.len() != w => {
                return Err(format!(
                    "line {line_no}: {} columns, expected {w} like the lines before (ragged CSV)",
                    row.len()
                ));
            }
            _ => width = Some(row.len()),
        }
        for (col, cell) in row.iter().enumerate() {
            let v: f64 =
                cell.parse().map_err(|_| format!("line {line_no}, column {}: {cell:?} is not a number", col + 1))?;
            let v32 = v as f32;
            if !v32.is_finite() {
                return Err(format!(
                    "line {line_no}, column {}: {cell:?} is not finite (NaN, Inf or beyond f32)",
                    col + 1
                ));
            }
            values.push(v32);
        }
        rows += 1;
    }
    if rows == 0 {
        return Err("no input rows".to_string());
    }
    Ok(Array2::from_shape_vec((rows, d_in), values).expect("rows × d_in values"))
}

/// Parse a `.npy` file into `[N, d]` f32 (`d` as stored; the caller checks it).
pub fn parse_npy(bytes: &[u8]) -> std::result::Result<Array2<f32>, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".to_string());
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10usize),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".to_string());
            }
            (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let end = start.checked_add(header_len).filter(|&e| e <= bytes.len()).ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(&bytes[start..end]).map_err(|_| "the .npy header is not text".to_string())?;
    let descr = dict_value(header, "descr").ok_or("the .npy header has no 'descr'")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let fortran = match dict_value(header, "fortran_order").ok_or("the .npy header has no 'fortran_order'")? {
        "True" => true,
        "False" => false,
        other => return Err(format!("bad fortran_order {other:?} in the .npy header")),
    };
    let shape_text = dict_value(header, "shape").ok_or("the .npy header has no 'shape'")?;
    let shape: Vec<usize> = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape {shape_text} in the .npy header")))
        .collect::<std::result::Result<_, _>>()?;
    if shape.len() != 2 {
        return Err(format!("array has shape {shape:?}, expected 2-D [N, d_in]"));
    }
    let (n, d) = (shape[0], shape[1]);
    let (size, little) = match descr {
        "<f4" | "|f4" | "=f4" => (4, true),
        "<f8" | "|f8" | "=f8" => (8, true),
        ">f4" => (4, false),
        ">f8" => (8, false),
        other => return Err(format!("dtype {other:?} is not supported (use float32 or float64)")),
    };
    let data = &bytes[end..];
    // A crafted header may claim any shape: the byte count must not wrap.
    let needed = n.checked_mul(d).and_then(|c| c.checked_mul(size));
    if needed != Some(data.len()) {
        let needs = needed.map_or_else(|| "more than 2^64".to_string(), |b| b.to_string());
        return Err(format!("holds {} data bytes, shape {shape:?} of {descr} needs {needs}", data.len()));
    }
    if n == 0 || d == 0 {
        return Err(format!("array has shape {shape:?}: no inputs"));
    }
    let values: Vec<f64> = data
        .chunks_exact(size)
        .map(|b| match (size, little) {
            (4, true) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            (4, false) => f32::from_be_bytes([b[0], b[1], b[2], b[3]]) as f64,
            (_, true) => f64::from_le_bytes(b.try_into().expect("8 bytes")),
            (_, false) => f64::from_be_bytes(b.try_into().expect("8 bytes")),
        })
        .collect();
    let bad_shape = |e: ndarray::ShapeError| format!("shape {shape:?}: {e}");
    let x = if fortran {
        Array2::from_shape_vec((d, n), values).map_err(bad_shape)?.reversed_axes().as_standard_layout().to_owned()
    } else {
        Array2::from_shape_vec((n, d), values).map_err(bad_shape)?
    };
    if let Some(((r, c), v)) = x.indexed_iter().find(|(_, v)| !(**v as f32).is_finite()) {
        return Err(format!("row {}, column {}: {v} is not finite (NaN, Inf or beyond f32)", r + 1, c + 1));
    }
    Ok(x.mapv(|v| v as f32))
}

/// The text after `'key':` up to the next top-level comma or closing brace.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header.find(&format!("'{key}'")).or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = header[pos + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0i32;
    for (i, ch) in rest.char_indices() {
        match ch {
            '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    Some(rest.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, fortran: bool, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn csv_with_and_without_header() {
        let a = parse_csv(b"x0,x1\n1,2\n3.5,-4e-1\n", 2).unwrap();
        let b = parse_csv(b"1,2\r\n\n3.5, -4e-1\n", 2).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, ndarray::array![[1.0f32, 2.0], [3.5, -0.4]]);
    }

    #[test]
    fn csv_errors_name_line_and_column() {
        let e = parse_csv(b"1,2\n3\n", 2).unwrap_err();
        assert!(e.contains("line 2") && e.contains("ragged"), "{e}");
        let e = parse_csv(b"1,2,3\n", 2).unwrap_err();
        assert!(e.contains("3 columns") && e.contains("takes 2"), "{e}");
        let e = parse_csv(b"1,2\n3,abc\n", 2).unwrap_err();
        assert!(e.contains("line 2, column 2") && e.contains("abc"), "{e}");
        let e = parse_csv(b"1,nan\n", 2).unwrap_err();
        assert!(e.contains("line 1, column 2") && e.contains("not finite"), "{e}");
        assert!(parse_csv(b"", 2).unwrap_err().contains("no input rows"));
        assert!(parse_csv(b"a,b\n", 2).unwrap_err().contains("no input rows"));
    }

    #[test]
    fn npy_f32_f64_and_fortran() {
        let vals = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let le: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let x = parse_npy(&npy("<f4", false, "(3, 2)", &le)).unwrap();
        assert_eq!(x, ndarray::array![[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]]);
        let be: Vec<u8> = vals.iter().flat_map(|v| f64::from(*v).to_be_bytes()).collect();
        assert_eq!(parse_npy(&npy(">f8", false, "(3, 2)", &be)).unwrap(), x);
        // Fortran order: column-major storage of the same matrix.
        let f: Vec<u8> = [1.0f64, 3.0, 5.0, 2.0, 4.0, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(parse_npy(&npy("<f8", true, "(3, 2)", &f)).unwrap(), x);
    }

    #[test]
    fn npy_errors() {
        let le: Vec<u8> = [1.0f32, f32::NAN].iter().flat_map(|v| v.to_le_bytes()).collect();
        let e = parse_npy(&npy("<f4", false, "(1, 2)", &le)).unwrap_err();
        assert!(e.contains("row 1, column 2"), "{e}");
        assert!(parse_npy(&npy("<i8", false, "(1, 1)", &[0; 8])).unwrap_err().contains("not supported"));
        assert!(parse_npy(&npy("<f4", false, "(2,)", &[0; 8])).unwrap_err().contains("2-D"));
        assert!(parse_npy(&npy("<f4", false, "(2, 2)", &[0; 8])).unwrap_err().contains("needs 16"));
        assert!(parse_npy(b"hello world").unwrap_err().contains("magic"));
        // Shapes whose byte count wraps around 2^64 (to 0 or to the bytes present).
        let e = parse_npy(&npy("<f4", false, "(4611686018427387904, 1)", &[])).unwrap_err();
        assert!(e.contains("needs more than 2^64"), "{e}");
        let e = parse_npy(&npy("<f8", true, "(2305843009213693953, 1)", &[0; 8])).unwrap_err();
        assert!(e.contains("needs more than 2^64"), "{e}");
        assert!(parse_npy(&npy("<f4", false, "(18446744073709551615, 2)", &[])).unwrap_err().contains("2^64"));
    }
}
