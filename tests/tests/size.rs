//! Sizes the host's code is held to: no file over 700 lines and no function over 100,
//! tests aside (a `#[cfg(test)]` item, a `tests.rs` file). A big file is a module that does
//! several things; a long function is a story nobody reads to the end. The source is read
//! as Rust (syn), so a brace in a string or a comment counts for nothing.

use std::path::{Path, PathBuf};

use syn::spanned::Spanned;
use syn::visit::Visit;

const FILE_LINES_MAX: usize = 700;
const FN_LINES_MAX: usize = 100;

/// Every `.rs` file under `host/`, but test-only files.
fn host_sources() -> Vec<PathBuf> {
    let mut files = statefold_tests::rust_files(&statefold_tests::workspace_root().join("host"));
    files.retain(|path| path.file_name().is_some_and(|n| n != "tests.rs"));
    files
}

fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("test")
            || (a.path().is_ident("cfg") && a.parse_args::<syn::Meta>().is_ok_and(|m| m.path().is_ident("test")))
    })
}

fn lines(span: proc_macro2::Span) -> usize {
    span.end().line - span.start().line + 1
}

/// Lines of test items, and each function's name and lines (test items' left out).
#[derive(Default)]
struct Sizes {
    test_lines: usize,
    functions: Vec<(String, usize, usize)>,
}

impl<'ast> Visit<'ast> for Sizes {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if is_test(attrs) {
            self.test_lines += lines(item.span());
        } else {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.functions.push((f.sig.ident.to_string(), f.span().start().line, lines(f.span())));
        syn::visit::visit_item_fn(self, f);
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test(&f.attrs) {
            self.functions.push((f.sig.ident.to_string(), f.span().start().line, lines(f.span())));
        }
        syn::visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if f.default.is_some() {
            self.functions.push((f.sig.ident.to_string(), f.span().start().line, lines(f.span())));
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

fn sizes(path: &Path) -> (usize, Sizes) {
    let text = std::fs::read_to_string(path).expect("a source file");
    let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{} is not Rust syn reads: {e}", path.display()));
    let mut sizes = Sizes::default();
    sizes.visit_file(&file);
    (text.lines().count(), sizes)
}

#[test]
fn no_host_file_or_function_is_too_long() {
    let root = statefold_tests::workspace_root();
    let (mut files, mut functions) = (Vec::new(), Vec::new());
    let sources = host_sources();
    assert!(sources.len() > 50, "host sources: {sources:?}");
    for path in sources {
        let (total, sizes) = sizes(&path);
        let name = path.strip_prefix(root).expect("under the root").display().to_string();
        let code = total - sizes.test_lines;
        if code > FILE_LINES_MAX {
            files.push(format!("{name}: {code} lines"));
        }
        for (function, line, length) in sizes.functions {
            if length > FN_LINES_MAX {
                functions.push(format!("{name}:{line} {function}: {length} lines"));
            }
        }
    }
    println!("files over {FILE_LINES_MAX} lines: {files:#?}\nfunctions over {FN_LINES_MAX} lines: {functions:#?}");
    assert!(files.is_empty() && functions.is_empty(), "too long: {files:#?} {functions:#?}");
}

#[test]
fn the_measure_sees_a_long_function_and_leaves_tests_out() {
    // The check itself, on a file written here: a 120-line function is seen at its length,
    // a test module of any length is not counted.
    let body: String = (0..118).map(|i| format!("    let _x{i} = {i};\n")).collect();
    let text = format!("fn long() {{\n{body}}}\n#[cfg(test)]\nmod tests {{\n    fn t() {{\n{body}    }}\n}}\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.rs");
    std::fs::write(&path, &text).unwrap();
    let (total, sizes) = sizes(&path);
    assert_eq!(sizes.functions, vec![("long".to_owned(), 1, 120)]);
    assert_eq!(total - sizes.test_lines, 120);
}
