//! Direct preference optimisation: [`data`] holds the pairs with the frozen
//! reference's log-probabilities, [`loss`] the DPO / IPO loss (with an optional NLL term
//! on the chosen responses), and the stage `tandem dpo` trains the policy on them.

pub mod data;
pub mod loss;
mod stage;

pub use stage::{run, DpoConfig, DpoSection};
