//! A reward model: [`data`] holds the preference records (one prompt, responses ranked
//! best first; `dpo` reads them too), [`loss`] the scalar head's scores and their
//! Bradley–Terry or Plackett–Luce loss, and the stage `tandem rm` trains it.

pub mod data;
pub mod loss;
mod stage;

pub use stage::{comparisons, run, tokenize, RmConfig, RmSection};
