//! Reading the catalog projection.
//!
//! Every request reads its offer and affiliate, so decoded views are memoised:
//! a read still asks sled for the row (so it is never stale), and decodes it
//! only when its bytes differ from the ones decoded last time.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

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
    offers: Arc<Memo<Offer>>,
    affiliates: Arc<Memo<Affiliate>>,
}

impl Catalog {
    /// Reads from `tree`, the Tree a [`crate::CatalogFold`] writes.
    pub fn new(tree: sled::Tree) -> Self {
        Self {
            tree,
            offers: Arc::default(),
            affiliates: Arc::default(),
        }
    }

    /// One offer.
    ///
    /// # Errors
    /// sled read failure.
    pub fn offer(&self, id: &str) -> Result<Option<Arc<Offer>>, sled::Error> {
        self.offers.get(&self.tree, offer_key(id))
    }

    /// One affiliate.
    ///
    /// # Errors
    /// sled read failure.
    pub fn affiliate(&self, id: &str) -> Result<Option<Arc<Affiliate>>, sled::Error> {
        self.affiliates.get(&self.tree, affiliate_key(id))
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

/// A decoded row with the bytes it was decoded from.
type Decoded<T> = (sled::IVec, Arc<T>);

/// Decoded rows by key.
#[derive(Debug)]
struct Memo<T> {
    rows: RwLock<HashMap<Vec<u8>, Decoded<T>>>,
}

impl<T> Default for Memo<T> {
    fn default() -> Self {
        Self {
            rows: RwLock::default(),
        }
    }
}

impl<T: serde::de::DeserializeOwned> Memo<T> {
    /// The row at `key`, decoded; `None` when absent or undecodable.
    fn get(&self, tree: &sled::Tree, key: Vec<u8>) -> Result<Option<Arc<T>>, sled::Error> {
        let Some(raw) = tree.get(&key)? else {
            return Ok(None);
        };
        {
            let rows = self
                .rows
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((seen, view)) = rows.get(&key) {
                if *seen == raw {
                    return Ok(Some(Arc::clone(view)));
                }
            }
        }
        let Ok(view) = serde_json::from_slice::<T>(&raw) else {
            return Ok(None);
        };
        let view = Arc::new(view);
        self.rows
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, (raw, Arc::clone(&view)));
        Ok(Some(view))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memoised_view_follows_its_row() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let tree = db.open_tree("catalog").unwrap();
        let memo = Memo::<serde_json::Value>::default();
        assert!(memo.get(&tree, b"k".to_vec()).unwrap().is_none());
        tree.insert("k", br#"{"v":1}"#.as_slice()).unwrap();
        let first = memo.get(&tree, b"k".to_vec()).unwrap().unwrap();
        let again = memo.get(&tree, b"k".to_vec()).unwrap().unwrap();
        assert!(Arc::ptr_eq(&first, &again), "same bytes: decoded once");
        tree.insert("k", br#"{"v":2}"#.as_slice()).unwrap();
        assert_eq!(memo.get(&tree, b"k".to_vec()).unwrap().unwrap()["v"], 2);
        tree.insert("k", b"not json".as_slice()).unwrap();
        assert!(memo.get(&tree, b"k".to_vec()).unwrap().is_none());
        tree.remove("k").unwrap();
        assert!(memo.get(&tree, b"k".to_vec()).unwrap().is_none());
    }
}
