//! A set of worker slots: a bit mask for the first 63 workers (no allocation, one-instruction set
//! operations, which is what makes a lookup's probes cheap) and a sorted list for the rest. The mask's top
//! bit is left free so a table can store "and more in the list" in the same word.
pub type Slot = u32;

/// Slots held in the mask.
pub const LOW_SLOTS: Slot = 63;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerSet {
    low: u64,
    high: Vec<Slot>,
}

impl WorkerSet {
    pub fn contains(&self, slot: Slot) -> bool {
        match slot {
            0..LOW_SLOTS => self.low & (1 << slot) != 0,
            _ => self.high.binary_search(&slot).is_ok(),
        }
    }

    /// Adds `slot`; false if it was there.
    pub fn insert(&mut self, slot: Slot) -> bool {
        match slot {
            0..LOW_SLOTS => {
                let had = self.contains(slot);
                self.low |= 1 << slot;
                !had
            }
            _ => match self.high.binary_search(&slot) {
                Ok(_) => false,
                Err(at) => {
                    self.high.insert(at, slot);
                    true
                }
            },
        }
    }

    /// Removes `slot`; false if it was not there.
    pub fn remove(&mut self, slot: Slot) -> bool {
        match slot {
            0..LOW_SLOTS => {
                let had = self.contains(slot);
                self.low &= !(1 << slot);
                had
            }
            _ => match self.high.binary_search(&slot) {
                Ok(at) => {
                    self.high.remove(at);
                    true
                }
                Err(_) => false,
            },
        }
    }

    pub fn is_empty(&self) -> bool {
        self.low == 0 && self.high.is_empty()
    }

    pub fn len(&self) -> usize {
        self.low.count_ones() as usize + self.high.len()
    }

    pub fn intersection(&self, other: &WorkerSet) -> WorkerSet {
        let high = if self.high.is_empty() || other.high.is_empty() {
            Vec::new()
        } else {
            self.high.iter().filter(|s| other.high.binary_search(s).is_ok()).copied().collect()
        };
        WorkerSet { low: self.low & other.low, high }
    }

    /// Slots in `self` and not in `other`.
    pub fn difference<'a>(&'a self, other: &'a WorkerSet) -> impl Iterator<Item = Slot> + 'a {
        let low = self.low & !other.low;
        mask_slots(low).chain(self.high.iter().copied().filter(|s| other.high.binary_search(s).is_err()))
    }

    pub fn iter(&self) -> impl Iterator<Item = Slot> + '_ {
        mask_slots(self.low).chain(self.high.iter().copied())
    }

    /// A set from its mask (top bit ignored) and its overflow list (sorted).
    pub fn from_parts(mask: u64, high: &[Slot]) -> Self {
        WorkerSet { low: mask & !(1 << LOW_SLOTS), high: high.to_vec() }
    }

    /// The mask part, top bit clear.
    pub fn mask(&self) -> u64 {
        self.low
    }

    pub fn overflow(&self) -> &[Slot] {
        &self.high
    }
}

fn mask_slots(mut mask: u64) -> impl Iterator<Item = Slot> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let slot = mask.trailing_zeros();
        mask &= mask - 1;
        Some(slot)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_set_on_both_sides_of_the_mask() {
        let mut a = WorkerSet::default();
        for slot in [3, 62, 63, 900, 5] {
            assert!(a.insert(slot));
        }
        assert!(!a.insert(63));
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![3, 5, 62, 63, 900]);
        let mut b = WorkerSet::default();
        for slot in [5, 900, 7] {
            b.insert(slot);
        }
        assert_eq!(a.intersection(&b).iter().collect::<Vec<_>>(), vec![5, 900]);
        assert_eq!(a.difference(&b).collect::<Vec<_>>(), vec![3, 62, 63]);
        assert!(a.remove(900) && !a.remove(900) && a.remove(3));
        assert_eq!(a.len(), 3);
        assert!(!a.is_empty());
    }
}
