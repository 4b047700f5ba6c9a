//! Gathering ahead of compute: a thread walks a run's tiles in order and gathers each into a
//! buffer while the caller computes the tiles before it, so that a store's reads (direct
//! I/O, a remote store) overlap the projection, the gates and the conv. It works because
//! every row id follows from the token ids alone: a layer hashes all its rows first, then
//! asks for tiles. The rows are the same whichever thread gathers them, so results are
//! bit-identical to gathering in place.

use crate::error::{EngramError, Result};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};

/// Tiles gathered ahead of the one being computed.
pub const TILES_AHEAD: usize = 2;

/// The consumer's end: gathered tiles in order, and the way to hand buffers back.
pub struct Feed {
    ready: Receiver<Result<Vec<f32>>>,
    free: Sender<Vec<f32>>,
}

impl Feed {
    /// Starts gathering `rows` rows in tiles of `tile` (`width` values per row) on a thread
    /// of `scope`: `gather(r0, r1, out)` fills rows `r0..r1` into `out`
    /// (`(r1 - r0) · width` values).
    pub fn spawn<'scope, 'env: 'scope, G>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        rows: usize,
        tile: usize,
        width: usize,
        gather: G,
    ) -> Feed
    where
        G: Fn(usize, usize, &mut [f32]) -> Result<()> + Send + 'env,
    {
        let tile = tile.max(1);
        let (ready_tx, ready) = sync_channel::<Result<Vec<f32>>>(TILES_AHEAD);
        let (free, free_rx) = channel::<Vec<f32>>();
        for _ in 0..TILES_AHEAD + 1 {
            // Never read before written: the gather fills every value of a tile's rows.
            let _ = free.send(vec![0f32; tile.min(rows) * width]);
        }
        scope.spawn(move || {
            let mut r0 = 0;
            while r0 < rows {
                let r1 = (r0 + tile).min(rows);
                // The consumer stopped (an error, or done): nothing more to gather.
                let Ok(mut buf) = free_rx.recv() else { return };
                let res = gather(r0, r1, &mut buf[..(r1 - r0) * width]).map(|()| buf);
                let failed = res.is_err();
                if ready_tx.send(res).is_err() || failed {
                    return;
                }
                r0 = r1;
            }
        });
        Feed { ready, free }
    }

    /// The next tile's rows (waits for its reads).
    pub fn next(&self) -> Result<Vec<f32>> {
        self.ready.recv().unwrap_or_else(|_| {
            Err(EngramError::invalid(
                "table gather",
                "a gathered tile",
                "the gathering thread stopped early",
            ))
        })
    }

    /// Hands a tile's buffer back for a later tile.
    pub fn give_back(&self, buf: Vec<f32>) {
        let _ = self.free.send(buf);
    }
}
