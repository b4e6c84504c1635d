//! The catalog both services fold: offers and affiliates.
//!
//! Each `catalog.v1.*` event carries the whole new state of its entity, so the fold
//! is an upsert. Both services run [`CatalogFold`] into a Tree of their own and read
//! it through [`Catalog`].

mod fold;
mod reads;
pub mod terms;
mod views;

pub use fold::{apply_affiliate, apply_offer, CatalogFold};
pub use reads::Catalog;
pub use terms::{Caps, ConversionStatus, DedupPolicy, Goal, Security};
pub use views::{Affiliate, GoalTerms, Offer, OfferStatus};

/// The affiliate postback URL template for a conversion on `offer` by `affiliate`:
/// the offer's override, else the affiliate's own; empty: none.
pub fn postback_template<'a>(offer: &'a Offer, affiliate: Option<&'a Affiliate>) -> &'a str {
    if offer.postback_url.is_empty() {
        affiliate.map_or("", |a| a.postback_url.as_str())
    } else {
        &offer.postback_url
    }
}
