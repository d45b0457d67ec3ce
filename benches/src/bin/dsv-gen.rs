//! `dsv-gen KIND DIR`: writes a benchmark data set (same bytes every run).
//!
//! Kinds: `binary` (40 files, 1 GB), `csv` (2,000 files, ~164 MB), `small`
//! (25,000 files of 1–8 KB), `edit-binary`, `append-csv`, `big SIZE_MB`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(kind), Some(dir)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: dsv-gen binary|csv|small|edit-binary|append-csv|big DIR [SIZE_MB]");
        std::process::exit(1);
    };
    let dir = std::path::Path::new(dir);
    let res = match kind.as_str() {
        "binary" => dsv_benches::gen_binary(dir, 1_000_000_000),
        "csv" => dsv_benches::gen_csv(dir, 2000, 1090),
        "small" => dsv_benches::gen_small(
            dir,
            args.get(3).and_then(|s| s.parse().ok()).unwrap_or(25_000),
        ),
        "edit-binary" => dsv_benches::edit_binary(dir),
        "append-csv" => dsv_benches::append_csv(dir, 2000, 1090),
        "big" => {
            let mb: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8192);
            dsv_benches::gen_big_file(dir, mb << 20)
        }
        other => {
            eprintln!("unknown kind {other}");
            std::process::exit(1);
        }
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
