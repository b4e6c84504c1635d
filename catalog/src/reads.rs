//! Reading the catalog projection.

use crate::views::{Affiliate, Offer};

pub(crate) fn offer_key(id: &str) -> Vec<u8> {
    [b"o/", id.as_bytes()].concat()
}

pub(crate) fn affiliate_key(id: &str) -> Vec<u8> {
    [b"a/", id.as_bytes()].concat()
}

/// Read access to a catalog Tree. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Catalog {
    tree: sled::Tree,
}

impl Catalog {
    /// Reads from `tree`, the Tree a [`crate::CatalogFold`] writes.
    pub fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    /// One offer.
    ///
    /// # Errors
    /// sled read failure.
    pub fn offer(&self, id: &str) -> Result<Option<Offer>, sled::Error> {
        common::store::get_json(&self.tree, &offer_key(id))
    }

    /// One affiliate.
    ///
    /// # Errors
    /// sled read failure.
    pub fn affiliate(&self, id: &str) -> Result<Option<Affiliate>, sled::Error> {
        common::store::get_json(&self.tree, &affiliate_key(id))
    }

    /// Every offer, by id.
    ///
    /// # Errors
    /// sled read failure.
    pub fn offers(&self) -> Result<Vec<Offer>, sled::Error> {
        self.scan(b"o/")
    }

    /// Every affiliate, by id.
    ///
    /// # Errors
    /// sled read failure.
    pub fn affiliates(&self) -> Result<Vec<Affiliate>, sled::Error> {
        self.scan(b"a/")
    }

    fn scan<T: serde::de::DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>, sled::Error> {
        let mut out = Vec::new();
        for row in self.tree.scan_prefix(prefix) {
            let (_, value) = row?;
            if let Ok(v) = serde_json::from_slice(&value) {
                out.push(v);
            }
        }
        Ok(out)
    }
}
