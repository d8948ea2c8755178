//! Operator tokens: stored by SHA-256 only, with a role, never deleted
//! (revocation sets `revoked_at`, so a name always means one token in the
//! audit). Creation and revocation write their audit row in the same
//! transaction; revocation refuses to leave no active admin token.

use otter_proto::api::{Role, TokenInfo};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, StoreError, is_unique_violation};
use crate::audit::{self, Actor, AuditEvent, AuditRecord};

/// An operator authenticated by an active token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// The token's name: the actor of the audit rows it causes.
    pub name: String,
    pub role: Role,
}

/// A token to store.
#[derive(Debug, Clone)]
pub struct NewToken<'a> {
    pub name: &'a str,
    /// SHA-256 (hex) of the token; the token itself is never stored.
    pub token_sha256: &'a str,
    pub role: Role,
}

/// Result of [`Store::create_operator_token`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCreated {
    Created,
    /// A token of this name exists, active or revoked; nothing was stored.
    NameTaken,
}

/// Result of [`Store::revoke_operator_token`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRevoked {
    Revoked(TokenInfo),
    Unknown,
    AlreadyRevoked,
    /// The token is the last active admin token; nothing was changed.
    LastAdmin,
}

fn parse_role(text: &str) -> Result<Role, StoreError> {
    text.parse()
        .map_err(|e| StoreError::corrupt("operator_tokens.role", e))
}

fn token_info(row: &AnyRow) -> Result<TokenInfo, StoreError> {
    let role: String = row.try_get("role")?;
    Ok(TokenInfo {
        name: row.try_get("name")?,
        role: parse_role(&role)?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

impl Store {
    /// Whether any operator token exists, active or revoked (false on first
    /// start only).
    pub async fn has_operator_tokens(&self) -> Result<bool, StoreError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM operator_tokens")
            .fetch_one(&self.pool)
            .await?;
        Ok(count > 0)
    }

    /// Stores the first admin token, created by the server itself at first
    /// start (no operator exists yet to be the actor of an audit row).
    pub async fn insert_first_admin_token(
        &self,
        name: &str,
        token_sha256: &str,
        at: &str,
    ) -> Result<(), StoreError> {
        let _gate = self.write_gate().await;
        sqlx::query(
            "INSERT INTO operator_tokens (name, token_sha256, role, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(name)
        .bind(token_sha256)
        .bind(Role::Admin.as_str())
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The operator holding the active token with this SHA-256 (hex), if
    /// any. Read on every request, so a revocation applies to the next one.
    pub async fn operator_by_token_sha256(
        &self,
        token_sha256: &str,
    ) -> Result<Option<Operator>, StoreError> {
        let row = sqlx::query(
            "SELECT name, role FROM operator_tokens WHERE token_sha256 = $1 AND revoked_at IS NULL",
        )
        .bind(token_sha256)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let role: String = row.try_get("role")?;
        Ok(Some(Operator {
            name: row.try_get("name")?,
            role: parse_role(&role)?,
        }))
    }

    /// Stores a token and its `token.created` audit row, by `actor`.
    pub async fn create_operator_token(
        &self,
        token: &NewToken<'_>,
        actor: &Actor,
        at: &str,
    ) -> Result<TokenCreated, StoreError> {
        let mut transaction = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO operator_tokens (name, token_sha256, role, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(token.name)
        .bind(token.token_sha256)
        .bind(token.role.as_str())
        .bind(at)
        .execute(&mut *transaction)
        .await;
        match inserted {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => return Ok(TokenCreated::NameTaken),
            Err(error) => return Err(error.into()),
        }
        let record = AuditRecord::new(actor, AuditEvent::TokenCreated)
            .details(serde_json::json!({ "token": token.name, "role": token.role.as_str() }));
        audit::append(&mut transaction, at, &record).await?;
        transaction.commit().await?;
        Ok(TokenCreated::Created)
    }

    /// Every token, active and revoked, by creation time.
    pub async fn operator_tokens(&self) -> Result<Vec<TokenInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, role, created_at, revoked_at FROM operator_tokens ORDER BY created_at, name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_info).collect()
    }

    /// Revokes the token `name` and writes its `token.revoked` audit row, by
    /// `actor`, unless it is unknown, already revoked or the last active
    /// admin token. The check and the change are one write transaction, so
    /// two concurrent revocations cannot both pass it.
    pub async fn revoke_operator_token(
        &self,
        name: &str,
        actor: &Actor,
        at: &str,
    ) -> Result<TokenRevoked, StoreError> {
        let mut transaction = self.begin_write().await?;
        let row = sqlx::query(
            "SELECT name, role, created_at, revoked_at FROM operator_tokens WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(row) = row else {
            return Ok(TokenRevoked::Unknown);
        };
        let mut info = token_info(&row)?;
        if info.revoked_at.is_some() {
            return Ok(TokenRevoked::AlreadyRevoked);
        }
        if info.role == Role::Admin {
            let active_admins: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM operator_tokens WHERE role = $1 AND revoked_at IS NULL",
            )
            .bind(Role::Admin.as_str())
            .fetch_one(&mut *transaction)
            .await?;
            if active_admins <= 1 {
                return Ok(TokenRevoked::LastAdmin);
            }
        }
        sqlx::query("UPDATE operator_tokens SET revoked_at = $1 WHERE name = $2")
            .bind(at)
            .bind(name)
            .execute(&mut *transaction)
            .await?;
        let record = AuditRecord::new(actor, AuditEvent::TokenRevoked)
            .details(serde_json::json!({ "token": name, "role": info.role.as_str() }));
        audit::append(&mut transaction, at, &record).await?;
        transaction.commit().await?;
        info.revoked_at = Some(at.to_owned());
        Ok(TokenRevoked::Revoked(info))
    }
}
