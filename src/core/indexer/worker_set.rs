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
        let bits = |slots: &[Slot]| slots.iter().fold(0u64, |mask, s| mask | 1 << s);
        let a = WorkerSet::from_parts(bits(&[3, 5, 62]) | 1 << LOW_SLOTS, &[63, 900]);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![3, 5, 62, 63, 900], "the top bit is not a slot");
        let b = WorkerSet::from_parts(bits(&[5, 7]), &[900]);
        assert_eq!(a.intersection(&b).iter().collect::<Vec<_>>(), vec![5, 900]);
        assert_eq!(a.difference(&b).collect::<Vec<_>>(), vec![3, 62, 63]);
        assert_eq!(a.len(), 5);
    }
}
