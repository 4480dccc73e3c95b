//! A task: one prompt as the environment sees it, whoever handed it out (a lease of the
//! coordinator, a row of an offline data set).

use tandem_model::ChatMessage;

/// A prompt, its reference answer and its record's info: what agent programs are given,
/// what an Environment service's `Reset` reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Task {
    /// The id of the group sampled on it (unique among the groups running at once).
    pub id: u64,
    /// Its index in the data set.
    pub prompt_index: u64,
    /// The prompt as text (empty when it is a conversation).
    pub text: String,
    /// The prompt as a conversation (empty when it is text).
    pub messages: Vec<ChatMessage>,
    /// The reference answer (empty when there is none).
    pub answer: String,
    /// The dataset record's info as the text of one JSON object (empty when it has
    /// none): `PromptLease.info_json`.
    pub info_json: String,
}

impl Task {
    /// The info as a JSON object (`{}` when the record has none, or, which the lease's
    /// check rules out, when it is not an object).
    pub fn info(&self) -> serde_json::Value {
        match serde_json::from_str(&self.info_json) {
            Ok(v @ serde_json::Value::Object(_)) => v,
            _ => serde_json::Value::Object(Default::default()),
        }
    }
}

impl Task {
    /// The prompt as plain text (a conversation's messages joined by newlines): what
    /// judges, reward services and environments read.
    pub fn prompt_text(&self) -> String {
        if self.messages.is_empty() {
            self.text.clone()
        } else {
            self.messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_reads_as_its_messages_joined() {
        let text = Task {
            text: "2 + 2 =".into(),
            ..Default::default()
        };
        assert_eq!(text.prompt_text(), "2 + 2 =");
        let chat = Task {
            messages: vec![ChatMessage::user("first"), ChatMessage::user("second")],
            ..Default::default()
        };
        assert_eq!(chat.prompt_text(), "first\nsecond");
    }
}
