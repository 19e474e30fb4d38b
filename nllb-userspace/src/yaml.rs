//! YAML in, typed values out, with the path of the field that was wrong.
//!
//! serde-saphyr parses (it is also what kube-client reads kubeconfigs
//! with); serde_path_to_error records where in the document the
//! deserializer was when it failed, so an error names `services[0].listen[1]`
//! as well as the line and column.

use serde::{Serialize, de::DeserializeOwned};
use serde_path_to_error::Segment;

use crate::errors::ConfigError;

/// A typed document from `text`; a bad field is reported at its path
/// (`(document)` when the YAML itself is broken at the top).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    // An empty `name:` is the empty string (as YAML 1.1 parsers read it),
    // so it gets the field's own "not a valid name" message.
    let options = serde_saphyr::options! { null_as_string: true };
    let mut path = String::new();
    serde_saphyr::with_deserializer_from_str_with_options(text, options, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = field_path(e.path());
            e.into_inner()
        })
    })
    .map_err(|e| ConfigError::new(if path.is_empty() { "(document)".into() } else { path }, message(&e)))
}

/// A value as YAML text (for files nllb writes: Envoy's config, kubeconfigs).
/// Long strings stay on one line (no folded `>` blocks), as people grep
/// these files for a type URL or a server address.
pub fn to_string<T: Serialize>(value: &T) -> String {
    let options = serde_saphyr::ser_options! { prefer_block_scalars: false };
    serde_saphyr::to_string_with_options(value, options)
        .expect("plain data (maps, lists, scalars) always serializes to YAML")
}

/// `services[0].listen[1]`: keys joined by dots, list indices in brackets;
/// a segment serde could not name is left out.
fn field_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

/// The parser's message for people (not its developer hints), with the
/// line and column but without the source excerpt: the path already says
/// where, and an excerpt spans lines in a log.
fn message(e: &serde_saphyr::Error) -> String {
    e.render_with_options(serde_saphyr::render_options! {
        formatter: &serde_saphyr::UserMessageFormatter,
        snippets: serde_saphyr::SnippetMode::Off,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[allow(dead_code)]
        items: Vec<Item>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        #[allow(dead_code)]
        port: u16,
    }

    #[test]
    fn errors_name_the_field_path_and_the_line() {
        let e = from_str::<Doc>("items:\n  - port: 1\n  - port: 70000\n").unwrap_err();
        assert_eq!(e.field, "items[1].port");
        assert!(e.message.contains("line 3"), "{e}");
        let e = from_str::<Doc>("items:\n  - prot: 1\n").unwrap_err();
        assert_eq!(e.field, "items[0].prot");
        assert!(e.message.contains("unknown field `prot`"), "{e}");
    }

    #[test]
    fn broken_yaml_and_duplicate_keys_are_document_errors_for_people() {
        let e = from_str::<Doc>("items: [\n").unwrap_err();
        assert!(!e.field.is_empty(), "{e}");
        let e = from_str::<Doc>("items: []\nitems: []\n").unwrap_err();
        assert_eq!(e.field, "(document)");
        assert!(e.message.contains("duplicate") && !e.message.contains("Policy"), "{e}");
    }
}
