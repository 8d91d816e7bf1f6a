//! Bank accounts with transfers between them, event-sourced.
//!
//! An [`Account`] is the fold of its deposits and withdrawals. Moving money between two accounts touches two
//! grains, and no transaction spans them, so a transfer is a grain of its own, [`Transfer`], keyed by a
//! transfer id the caller chooses: a small saga that records each step as an event —
//! requested → debited → credited (or failed) — and drives the next one.
//!
//! - **Nothing is lost or made up.** The accounts apply a transfer's withdrawal and deposit at most once each:
//!   they remember the ids they applied, so a step retried after an unknown outcome (a timeout, a silo that
//!   died mid-call) is answered as before instead of applied twice. The transfer records `Debited` before it
//!   asks for the deposit, so a transfer interrupted between the two finishes when it is run again.
//! - **Run it again until it answers.** [`TransferRef::run`] is idempotent: calling it again with the same id
//!   resumes the saga where it stopped, and a finished transfer answers with its outcome. Money is only "in
//!   flight" between a debit and its credit, and every transfer that is run to an answer lands.
//!
//! Accounts never call each other (only a transfer calls them), so two transfers in opposite directions cannot
//! wait on each other. An account keeps the ids of the transfers it applied forever here; a real one would
//! forget them once no retry can come (after the transfers' retry horizon).

use std::collections::BTreeSet;

use grains::prelude::*;

/// An account's balance, and the transfers it applied.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountState {
    /// Whether the account was opened.
    pub opened: bool,
    /// The balance in cents (never negative).
    pub balance: i64,
    /// Transfer ids whose withdrawal or deposit this account applied.
    pub applied: BTreeSet<String>,
}

/// What happens to an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountEvent {
    /// The account was opened with an initial balance.
    Opened {
        /// Cents.
        initial: i64,
    },
    /// Money left the account for a transfer.
    Withdrawn {
        /// The transfer.
        transfer: String,
        /// Cents.
        amount: i64,
    },
    /// Money arrived for a transfer.
    Deposited {
        /// The transfer.
        transfer: String,
        /// Cents.
        amount: i64,
    },
}

impl EventSourced for AccountState {
    type Event = AccountEvent;

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { initial } => {
                self.opened = true;
                self.balance += initial;
            }
            AccountEvent::Withdrawn { transfer, amount } => {
                self.balance -= amount;
                self.applied.insert(transfer.clone());
            }
            AccountEvent::Deposited { transfer, amount } => {
                self.balance += amount;
                self.applied.insert(transfer.clone());
            }
        }
    }

    fn tags(_: &AccountEvent) -> Vec<String> {
        vec!["bank".to_owned()]
    }
}

/// What can go wrong with an account or a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum BankError {
    /// Amounts are positive.
    #[error("the amount must be positive")]
    NonPositiveAmount,
    /// The account was never opened (or was opened already, for `open`).
    #[error("account {0}: {1}")]
    Account(String, String),
    /// The balance does not cover the withdrawal.
    #[error("insufficient funds: balance {balance}, asked {amount}")]
    InsufficientFunds {
        /// The balance.
        balance: i64,
        /// The amount asked.
        amount: i64,
    },
    /// A transfer id was reused for another transfer.
    #[error("transfer {0} was requested with other details")]
    TransferMismatch(String),
    /// A transfer to the account it comes from.
    #[error("a transfer needs two accounts")]
    SameAccount,
    /// A step could not be completed now (an account unreachable, storage failing): run the transfer again.
    #[error("unavailable, retry: {0}")]
    Unavailable(String),
}

impl From<StorageError> for BankError {
    fn from(e: StorageError) -> Self {
        BankError::Unavailable(e.to_string())
    }
}

impl From<CallError> for BankError {
    fn from(e: CallError) -> Self {
        BankError::Unavailable(e.to_string())
    }
}

/// A bank account.
#[grain(idle_timeout = "10m")]
pub struct Account {
    #[journal(name = "account", snapshot_every = 100)]
    account: Journaled<AccountState>,
    ctx: GrainContext,
}

#[grain]
impl Account {
    /// Opens the account with `initial` cents.
    pub async fn open(&mut self, initial: i64) -> Result<i64, BankError> {
        if initial < 0 {
            return Err(BankError::NonPositiveAmount);
        }
        if self.account.opened {
            return Err(BankError::Account(self.name(), "already open".into()));
        }
        self.account.persist(AccountEvent::Opened { initial }).await?;
        Ok(self.account.balance)
    }

    /// Takes `amount` out for `transfer`; returns the balance. Applied once per transfer id: a retry answers
    /// as the first call did.
    pub async fn withdraw(&mut self, transfer: String, amount: i64) -> Result<i64, BankError> {
        self.check(amount)?;
        if self.account.applied.contains(&transfer) {
            return Ok(self.account.balance);
        }
        if self.account.balance < amount {
            return Err(BankError::InsufficientFunds { balance: self.account.balance, amount });
        }
        self.account.persist(AccountEvent::Withdrawn { transfer, amount }).await?;
        Ok(self.account.balance)
    }

    /// Puts `amount` in for `transfer`; returns the balance. Applied once per transfer id.
    pub async fn deposit(&mut self, transfer: String, amount: i64) -> Result<i64, BankError> {
        self.check(amount)?;
        if !self.account.applied.contains(&transfer) {
            self.account.persist(AccountEvent::Deposited { transfer, amount }).await?;
        }
        Ok(self.account.balance)
    }

    /// The balance in cents.
    pub async fn balance(&self) -> i64 {
        self.account.balance
    }

    /// The account's events, oldest first.
    pub async fn statement(&self) -> Result<Vec<AccountEvent>, BankError> {
        Ok(self.account.events(0, usize::MAX).await?.into_iter().map(|(_, e)| e).collect())
    }

    fn check(&self, amount: i64) -> Result<(), BankError> {
        if amount <= 0 {
            return Err(BankError::NonPositiveAmount);
        }
        if !self.account.opened {
            return Err(BankError::Account(self.name(), "not open".into()));
        }
        Ok(())
    }

    fn name(&self) -> String {
        self.ctx.id().key().to_string()
    }
}

/// Where a transfer is.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferState {
    /// Not requested yet.
    #[default]
    New,
    /// Requested: debit `from`, then credit `to`.
    Requested {
        /// The account debited.
        from: String,
        /// The account credited.
        to: String,
        /// Cents.
        amount: i64,
        /// Whether `from` was debited.
        debited: bool,
    },
    /// Done: the money moved.
    Completed {
        /// The account debited.
        from: String,
        /// The account credited.
        to: String,
        /// Cents.
        amount: i64,
    },
    /// Refused before any money moved.
    Failed {
        /// Why.
        reason: BankError,
    },
}

/// What happens to a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferEvent {
    /// The transfer was asked for.
    Requested {
        /// The account to debit.
        from: String,
        /// The account to credit.
        to: String,
        /// Cents.
        amount: i64,
    },
    /// `from` was debited.
    Debited,
    /// `to` was credited: the transfer is complete.
    Credited,
    /// The transfer was refused (nothing moved).
    Failed {
        /// Why.
        reason: BankError,
    },
}

impl EventSourced for TransferState {
    type Event = TransferEvent;

    fn apply(&mut self, event: &TransferEvent) {
        *self = match (std::mem::take(self), event) {
            (TransferState::New, TransferEvent::Requested { from, to, amount }) => {
                TransferState::Requested { from: from.clone(), to: to.clone(), amount: *amount, debited: false }
            }
            (TransferState::Requested { from, to, amount, .. }, TransferEvent::Debited) => {
                TransferState::Requested { from, to, amount, debited: true }
            }
            (TransferState::Requested { from, to, amount, .. }, TransferEvent::Credited) => {
                TransferState::Completed { from, to, amount }
            }
            (_, TransferEvent::Failed { reason }) => TransferState::Failed { reason: reason.clone() },
            (state, _) => state, // an event out of order changes nothing (the grain never raises one)
        };
    }

    fn tags(_: &TransferEvent) -> Vec<String> {
        vec!["bank".to_owned()]
    }
}

/// One transfer between two accounts, keyed by a transfer id the caller chooses.
#[grain(idle_timeout = "1m")]
pub struct Transfer {
    #[journal(name = "transfer")]
    transfer: Journaled<TransferState>,
    ctx: GrainContext,
}

#[grain]
impl Transfer {
    /// Moves `amount` cents from `from` to `to`, or resumes this transfer if it was run before (with the same
    /// details). `Ok` once the money has moved; `Unavailable` means "run it again"; any other error is final,
    /// and nothing moved.
    pub async fn run(&mut self, from: String, to: String, amount: i64) -> Result<(), BankError> {
        let id = self.ctx.id().key().to_string();
        match self.transfer.state().clone() {
            TransferState::New => {
                if amount <= 0 {
                    return Err(BankError::NonPositiveAmount);
                }
                if from == to {
                    return Err(BankError::SameAccount);
                }
                self.transfer.persist(TransferEvent::Requested { from: from.clone(), to: to.clone(), amount }).await?;
            }
            TransferState::Requested { from: f, to: t, amount: a, .. }
            | TransferState::Completed { from: f, to: t, amount: a }
                if (&f, &t, a) != (&from, &to, amount) =>
            {
                return Err(BankError::TransferMismatch(id));
            }
            TransferState::Completed { .. } => return Ok(()),
            TransferState::Failed { reason } => return Err(reason),
            TransferState::Requested { .. } => {} // resume
        }
        if let TransferState::Requested { debited: false, .. } = self.transfer.state() {
            match self.ctx.grain::<Account>(from.clone()).withdraw(id.clone(), amount).await? {
                Ok(_) => {
                    self.transfer.persist(TransferEvent::Debited).await?;
                }
                Err(BankError::Unavailable(reason)) => return Err(BankError::Unavailable(reason)),
                Err(refused) => {
                    self.transfer.persist(TransferEvent::Failed { reason: refused.clone() }).await?;
                    return Err(refused);
                }
            }
        }
        // Debited: the credit must land; an account that refuses a deposit is a bug, so keep retrying.
        self.ctx.grain::<Account>(to.clone()).deposit(id, amount).await??;
        self.transfer.persist(TransferEvent::Credited).await?;
        Ok(())
    }

    /// Where the transfer is.
    pub async fn state(&self) -> TransferState {
        self.transfer.state().clone()
    }
}
