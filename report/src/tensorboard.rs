//! TensorBoard event files (`[run] tensorboard`): `RUN_DIR/tensorboard/
//! events.out.tfevents.<secs>.<hostname>`, one per trainer process (a resumed trainer
//! starts a new file beside the old ones; TensorBoard reads them all).
//!
//! A file is a sequence of TFRecords, each
//!
//!   u64 length (LE) · u32 masked CRC-32C of those 8 bytes · data · u32 masked CRC-32C of data
//!
//! with mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 (wrapping), around one
//! `tensorflow.Event` protobuf: the first carries `file_version = "brain.Event:2"`,
//! each later one a step's `Summary` of scalars (`simple_value`) or of text (a string
//! tensor with the `text` plugin's metadata). The messages are written by hand with
//! `prost` (field numbers as in TensorFlow's `event.proto`, `summary.proto`,
//! `tensor.proto`): only the fields Tandem writes.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// One of the `what` oneof: the first record's "brain.Event:2".
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    /// The other member of `what` Tandem writes.
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `tensorflow.Summary.Value`: a scalar (`simple_value`) or a tensor with metadata.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    pub tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
}

/// `tensorflow.SummaryMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `tensorflow.TensorProto`: only a string tensor's fields.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// `DataType`: [`DT_STRING`].
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    /// Empty: a scalar.
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShapeProto>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto` with no dimensions (a scalar).
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {}

/// `tensorflow.DataType.DT_STRING`.
pub const DT_STRING: i32 = 7;

/// The first record's `file_version`.
pub const FILE_VERSION: &str = "brain.Event:2";

/// The masked CRC-32C TFRecord stores: ((c >> 15) | (c << 17)) + 0xa282ead8.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// An open event file, written a step at a time.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` (mode 0700; a link there is refused) and a new event file in it
    /// (mode 0600, never through a link, never over an existing file), and writes the
    /// file-version record.
    pub fn create(dir: &Path) -> Result<Self> {
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |cause| Error::Io { what, path, cause }
        };
        match std::fs::symlink_metadata(dir) {
            Ok(m) if !m.is_dir() => {
                return Err(Error::Io {
                    what: "using (not a folder: a link or a file is refused)",
                    path: dir.to_path_buf(),
                    cause: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                })
            }
            Ok(_) => {}
            Err(_) => std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io("creating", dir))?,
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let base = format!("events.out.tfevents.{secs}.{}", hostname());
        let (file, path) = create_new(dir, &base).map_err(io("creating", &dir.join(&base)))?;
        let mut w = EventWriter { file, path };
        w.write(&Event {
            wall_time: wall_time(),
            file_version: Some(FILE_VERSION.into()),
            ..Default::default()
        })?;
        w.flush()?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event as a record (buffered by the OS until [`Self::flush`]).
    pub fn write(&mut self, event: &Event) -> Result<()> {
        let bytes = record(&prost::Message::encode_to_vec(event));
        self.file.write_all(&bytes).map_err(|cause| Error::Io {
            what: "writing",
            path: self.path.clone(),
            cause,
        })
    }

    /// Scalars of `step`: every finite value as `simple_value` under its name.
    pub fn scalars<'a>(
        &mut self,
        step: u64,
        values: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> Result<()> {
        let value: Vec<Value> = values
            .into_iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| Value {
                tag: tag.to_string(),
                simple_value: Some(v as f32),
                ..Default::default()
            })
            .collect();
        if value.is_empty() {
            return Ok(());
        }
        self.summary(step, value)
    }

    /// A text summary of `step` (Markdown, shown by TensorBoard's text tab).
    pub fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        let value = Value {
            tag: tag.to_string(),
            tensor: Some(TensorProto {
                dtype: DT_STRING,
                tensor_shape: Some(TensorShapeProto {}),
                string_val: vec![text.as_bytes().to_vec()],
            }),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: "text".into(),
                    content: Vec::new(),
                }),
            }),
            ..Default::default()
        };
        self.summary(step, vec![value])
    }

    fn summary(&mut self, step: u64, value: Vec<Value>) -> Result<()> {
        self.write(&Event {
            wall_time: wall_time(),
            step: i64::try_from(step).unwrap_or(i64::MAX),
            summary: Some(Summary { value }),
            ..Default::default()
        })
    }

    /// Pushes what was written to the file (TensorBoard reads it as it grows).
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|cause| Error::Io {
            what: "flushing",
            path: self.path.clone(),
            cause,
        })
    }
}

/// `dir/base`, or `dir/base.N` for the first N ≥ 1 free when it exists (two trainers
/// started in the same second), created new with mode 0600 without following a link.
fn create_new(dir: &Path, base: &str) -> std::io::Result<(std::fs::File, PathBuf)> {
    let mut n = 0u32;
    loop {
        let name = match n {
            0 => base.to_string(),
            n => format!("{base}.{n}"),
        };
        let path = dir.join(name);
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path);
        match opened {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Seconds since the epoch, as `Event.wall_time`.
fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// This machine's name as a file name may hold it: letters, digits, `-`, `_`, `.`
/// (anything else becomes `_`), at most 64 bytes; `localhost` when unknown.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.chars().all(|c| c == '.') {
        "localhost".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TensorFlow's own example: the masked CRC of the 8-byte length of an empty
    /// record, and CRC-32C's check value.
    #[test]
    #[allow(clippy::manual_rotate)] // the mask as TFRecord's documentation writes it
    fn the_framing_matches_tensorflow() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let r = record(b"");
        assert_eq!(r.len(), 16);
        assert_eq!(&r[..8], &0u64.to_le_bytes());
        let c = crc32c::crc32c(&r[..8]);
        let masked = ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8);
        assert_eq!(u32::from_le_bytes(r[8..12].try_into().unwrap()), masked);
    }

    #[test]
    fn events_round_trip_and_links_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tb = dir.path().join("tb");
        let mut w = EventWriter::create(&tb).unwrap();
        w.scalars(3, [("loss", 0.5), ("nan", f64::NAN)]).unwrap();
        w.text(3, "samples", "hi").unwrap();
        w.flush().unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut events = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            events.push(<Event as prost::Message>::decode(data).unwrap());
            at += 16 + len;
        }
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
        let v = &events[1].summary.as_ref().unwrap().value;
        assert_eq!(
            (v.len(), v[0].tag.as_str(), v[0].simple_value),
            (1, "loss", Some(0.5))
        );
        assert_eq!(events[2].step, 3);
        // A second writer in the same second gets a file of its own.
        let second = EventWriter::create(&tb).unwrap();
        assert_ne!(second.path(), w.path());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&tb, &link).unwrap();
        assert!(EventWriter::create(&link).is_err());
    }
}
