//! A set of worker slots: a bit mask for the first 62 workers (no allocation, one-instruction set
//! operations, which is what makes a lookup's probes cheap) and a sorted list for the rest. The mask's top
//! two bits are left free for a table to say how the rest is stored.
use smallvec::SmallVec;

pub type Slot = u32;

/// Slots held in the mask.
pub const LOW_SLOTS: Slot = 62;

/// The mask's bits that are slots.
pub const LOW_MASK: u64 = (1 << LOW_SLOTS) - 1;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerSet {
    low: u64,
    /// Sorted; inline up to two, the usual count past the mask, so a lookup's sets do not allocate.
    high: SmallVec<[Slot; 2]>,
}

impl WorkerSet {
    pub fn len(&self) -> usize {
        self.low.count_ones() as usize + self.high.len()
    }

    pub fn intersection(&self, other: &WorkerSet) -> WorkerSet {
        let high = if self.high.is_empty() || other.high.is_empty() {
            SmallVec::new()
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

    /// A set from its mask (bits past `LOW_SLOTS` ignored) and the slots past it (sorted).
    pub fn from_parts(mask: u64, high: &[Slot]) -> Self {
        WorkerSet { low: mask & LOW_MASK, high: high.into() }
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
        let a = WorkerSet::from_parts(bits(&[3, 5, 61]) | 3 << LOW_SLOTS, &[62, 900]);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![3, 5, 61, 62, 900], "the top bits are not slots");
        let b = WorkerSet::from_parts(bits(&[5, 7]), &[900]);
        assert_eq!(a.intersection(&b).iter().collect::<Vec<_>>(), vec![5, 900]);
        assert_eq!(a.difference(&b).collect::<Vec<_>>(), vec![3, 61, 62]);
        assert_eq!(a.len(), 5);
    }
}
