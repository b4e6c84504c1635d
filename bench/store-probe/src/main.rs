//! sled against fjall on the clicks fold's write pattern (bench/notes.md, tenth
//! round): per click a read of a new 250-byte row's key, then the row under
//! that time-ordered key, a rewrite of one of 65,536 bucket rows and four
//! counters; committed per 1,024 clicks without fsync, one thread. Then point
//! reads of a third of the rows in a scrambled order.
//!
//! `cargo run --release -- sled|fjall [clicks, default 600000] [fjall cache MiB]`

use std::collections::BTreeMap;
use std::time::Instant;

use sha2::Digest;

trait Store {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    fn commit(&mut self, writes: BTreeMap<Vec<u8>, Vec<u8>>);
}

struct Sled(sled::Tree);

impl Store for Sled {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(key).unwrap().map(|v| v.to_vec())
    }
    fn commit(&mut self, writes: BTreeMap<Vec<u8>, Vec<u8>>) {
        for (k, v) in writes {
            self.0.insert(k, v).unwrap();
        }
    }
}

struct Fjall(fjall::Keyspace, fjall::PartitionHandle);

impl Store for Fjall {
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.1.get(key).unwrap().map(|v| v.to_vec())
    }
    fn commit(&mut self, writes: BTreeMap<Vec<u8>, Vec<u8>>) {
        let mut batch = self.0.batch();
        for (k, v) in writes {
            batch.insert(&self.1, k, v);
        }
        batch.commit().unwrap();
    }
}

/// Folds `n` clicks; returns clicks/s and a third of the row keys.
fn write(store: &mut dyn Store, n: usize) -> (f64, Vec<Vec<u8>>) {
    let payload = vec![7u8; 250];
    let mut keys = Vec::new();
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let mut staged = BTreeMap::<Vec<u8>, Vec<u8>>::new();
        let read = |staged: &BTreeMap<Vec<u8>, Vec<u8>>, store: &dyn Store, k: &[u8]| {
            staged.get(k).cloned().or_else(|| store.get(k))
        };
        for _ in 0..1024 {
            i += 1;
            let id = uuid::Uuid::now_v7().to_string();
            let key = [b"c/".as_slice(), id.as_bytes()].concat();
            let _ = store.get(&key);
            let fingerprint = sha2::Sha256::digest(id.as_bytes());
            let bucket = [b"f/".as_slice(), &fingerprint[..2]].concat();
            let mut row = read(&staged, &*store, &bucket).unwrap_or_default();
            row.extend_from_slice(&fingerprint[2..18]);
            staged.insert(bucket, row);
            // Gross and unique counts share a 16-byte row (clicks format 4).
            for counter in [
                format!("n/o/offer-{}", i % 10),
                format!("n/a/aff-{}", i % 50),
            ] {
                let k = counter.into_bytes();
                let mut v = read(&staged, &*store, &k).unwrap_or_else(|| vec![0; 16]);
                for half in v.chunks_exact_mut(8) {
                    let n = u64::from_be_bytes((&*half).try_into().unwrap()) + 1;
                    half.copy_from_slice(&n.to_be_bytes());
                }
                staged.insert(k, v);
            }
            if i % 3 == 0 {
                keys.push(key.clone());
            }
            staged.insert(key, payload.clone());
        }
        store.commit(staged);
    }
    (n as f64 / start.elapsed().as_secs_f64(), keys)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map_or("sled", String::as_str);
    let n: usize = args.get(2).map_or(600_000, |s| s.parse().unwrap());
    let cache_mib: u64 = args.get(3).map_or(0, |s| s.parse().unwrap());
    let dir = std::env::temp_dir().join(format!("store-probe-{which}-{}", std::process::id()));
    let mut store: Box<dyn Store> = match which {
        "sled" => Box::new(Sled(sled::open(&dir).unwrap().open_tree("t").unwrap())),
        "fjall" => {
            let mut config = fjall::Config::new(&dir);
            if cache_mib > 0 {
                config = config.cache_size(cache_mib * 1024 * 1024);
            }
            let keyspace = config.open().unwrap();
            let partition = keyspace.open_partition("t", Default::default()).unwrap();
            Box::new(Fjall(keyspace, partition))
        }
        other => panic!("unknown store {other}: sled or fjall"),
    };
    let (rate, keys) = write(store.as_mut(), n);
    let start = Instant::now();
    let found = (0..keys.len())
        .filter(|j| store.get(&keys[(j * 7919) % keys.len()]).is_some())
        .count();
    let reads = keys.len() as f64 / start.elapsed().as_secs_f64();
    println!(
        "{which}: {rate:.0} clicks/s written; {reads:.0} point reads/s ({found} of {} found)",
        keys.len()
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
