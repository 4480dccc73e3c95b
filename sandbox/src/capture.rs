//! An output stream read to its end on a thread of its own, keeping one end of it.

use std::io::Read;
use std::thread::JoinHandle;

use crate::limits::Keep;

/// Reads `r` to its end on a new thread; the text keeps `keep`'s end and says how much
/// was cut.
pub(crate) fn spawn(mut r: impl Read + Send + 'static, keep: Keep) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let (cap, tail) = match keep {
            Keep::Head(n) => (n, false),
            Keep::Tail(n) => (n, true),
        };
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        let mut total = 0usize;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            total = total.saturating_add(n);
            if tail {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * cap {
                    kept.drain(..kept.len() - cap);
                }
            } else {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
        if kept.len() > cap {
            kept.drain(..kept.len() - cap);
        }
        let text = String::from_utf8_lossy(&kept).into_owned();
        match (total > cap, tail) {
            (false, _) => text,
            (true, false) => format!("{text}\n[output cut: {total} bytes, the first {cap} kept]"),
            (true, true) => format!("[output cut: {total} bytes, the last {cap} kept]\n{text}"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_end_it_is_told_and_says_what_it_cut() {
        let data = (0..20_000u32)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>();
        let head = spawn(std::io::Cursor::new(data.clone()), Keep::Head(100))
            .join()
            .unwrap();
        assert!(head.starts_with("abcdefghij"));
        assert!(
            head.ends_with("[output cut: 20000 bytes, the first 100 kept]"),
            "{head}"
        );
        let tail = spawn(std::io::Cursor::new(data.clone()), Keep::Tail(100))
            .join()
            .unwrap();
        let expect = String::from_utf8(data[data.len() - 100..].to_vec()).unwrap();
        assert!(tail.starts_with("[output cut: 20000 bytes, the last 100 kept]\n"));
        assert!(tail.ends_with(&expect));
        let whole = spawn(std::io::Cursor::new(b"short".to_vec()), Keep::Tail(100))
            .join()
            .unwrap();
        assert_eq!(whole, "short");
    }
}
